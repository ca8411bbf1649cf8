"""Helpers for the tuning tests: a small selected.json and a CLI config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from tiny_tuner import tiny_tuner_data, tiny_tuner_model


class StopAfterEpoch(Callback):
    """Stops training after an epoch, as an interruption would (the schedule is unchanged)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class CrashAtStep(Callback):
    """Raises when optimiser step ``step`` would start, as a crash between checkpoints would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash before step {self.step}")


class RecordBatches(Callback):
    """Appends each trained batch's ``[epoch, batch_idx, sample ids]`` to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
    ) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.current_epoch, batch_idx, batch["ids"]]) + "\n")


def selected_from_demo(demo_root: Path, out: Path, n: int = 8) -> Path:
    """The first ``n`` demo candidates, one per image first, as ``select`` writes them."""
    rows = [json.loads(x) for x in (demo_root / "candidates.jsonl").read_text().splitlines()]
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    picked = []
    while len(picked) < n:
        for group in by_image.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(picked, indent=1))
    return out


def tuner_config(
    tmp: Path,
    data: Path,
    image_root: Path,
    stop_after: int | None = None,
    callbacks: list[dict] | None = None,
    every_n_train_steps: int | None = None,
    **model: object,
) -> Path:
    """A CLI config: tiny LLaVA, LoRA, 2 CPU steps per epoch, MLflow store under ``tmp``;
    ``callbacks`` are added, ``every_n_train_steps`` also checkpoints within epochs."""
    out = tmp / "out"
    cfg = {
        "seed_everything": 0,
        "model": tiny_tuner_model(**model),
        "data": tiny_tuner_data(data, image_root),
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "default_root_dir": str(out),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "biomedvital.tracking.MLflowLogger",
                "init_args": {"experiment": "tuning", "store": str(tmp / "mlruns")},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(out / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": every_n_train_steps,
                    },
                },
                {
                    "class_path": "biomedvital.tuning.ExportTuned",
                    "init_args": {"dirpath": str(out / "export")},
                },
            ],
        },
    }
    cfg["trainer"]["callbacks"] += callbacks or []
    if stop_after is not None:
        cfg["trainer"]["callbacks"].append(
            {"class_path": "tuning_helpers.StopAfterEpoch", "init_args": {"epoch": stop_after}}
        )
    path = tmp / f"tuner{'' if stop_after is None else '-stop'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
