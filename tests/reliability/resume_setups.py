"""The configurations the kill-and-resume trials train: the shipped configs, read from ``conf/``
as users run them (DataLoader workers included), each with a small overlay.

An overlay sets only sizes, epochs, paths, devices and worker counts, never an option the trial
is about: the demo selector keeps its fine-tuned backbone, dropout, hinge loss and 1 worker; the
demo tuner its LoRA dropout, accumulation and 1 worker; the paper configs their options at a
tiny size (a tiny backbone or LLaVA in place of the published weights, 2 workers, FSDP2 on 2 CPU
processes with the paper's bf16 weights and precision), and the ablations theirs (``frozen``,
``ranknet``) over the paper selector. Every run has a folder of its own in which the shipped
relative paths hold: ``data/demo`` (the embedded demo pool), the tuner's ``selected.json``,
``mlruns`` (an empty MLflow store, copied), ``outputs/...`` written by the run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def _checkpoints(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "biomedvital.tracking.Checkpoints", "init_args": init_args}


@dataclass(frozen=True)
class Setup:
    """One shipped configuration at trial size.

    Args:
        name: the trial's name.
        configs: the shipped config files (repository-relative), in order.
        overlay: what the trial changes (sizes, epochs, paths, devices, workers).
        root: the run's ``trainer.default_root_dir`` as the config ships it.
        kills: chosen (epoch, batch) kill points: the first an epoch boundary (just after the
            first ``last.ckpt``), then mid-epoch ones.
        selected: where the config reads the tuner's ``selected.json`` (relative), if it does.
        samples: how many demo conversations that file holds.
        sharded: the checkpoints are FSDP2 folders.
    """

    name: str
    configs: tuple[str, ...]
    overlay: dict[str, Any]
    root: str
    kills: tuple[tuple[int, int], ...]
    selected: str | None = None
    samples: int = 12
    sharded: bool = False

    @property
    def tuner(self) -> bool:
        return self.selected is not None

    def argv(self, run: Path, *extra: str) -> list[str]:
        """``fit`` with the shipped configs and the overlay written in ``run``."""
        configs = [a for c in self.configs for a in ("--config", str(REPO / c))]
        return ["fit", *configs, "--config", str(run / "overlay.yaml"), *extra]

    @property
    def stamp(self) -> str:
        """The file a finished fit writes last but one (before ``run.fit.json``)."""
        return f"{self.root}/run.fit.json"


_NO_BAR = {"enable_progress_bar": False}

DEMO_SELECTOR = Setup(
    "demo_selector",
    ("conf/demo/selector.yaml",),
    {
        "data": {"init_args": {"model_pairs": 128, "val_model_pairs": 32}},
        "trainer": {"max_epochs": 2, **_NO_BAR},
    },
    root="outputs/demo/selector",
    kills=((1, 0), (1, 1)),  # 3 batches an epoch; checkpoints at epoch ends (as shipped)
)
DEMO_TUNER = Setup(
    "demo_tuner",
    ("conf/demo/tuner.yaml",),
    {"trainer": {"max_epochs": 2, **_NO_BAR}},
    root="outputs/demo/tuner",
    kills=((1, 0), (1, 1)),  # 3 micro-batches, 2 steps an epoch: (1, 1) splits a step
    selected="outputs/demo/selected/selected.json",
)
DEMO_SELECTOR_FULL = Setup(
    "demo_selector_full", ("conf/demo/selector.yaml",), {}, "outputs/demo/selector", ((1, 0),)
)
DEMO_TUNER_FULL = Setup(
    "demo_tuner_full",
    ("conf/demo/tuner.yaml",),
    {},
    "outputs/demo/tuner",
    ((1, 0),),
    selected="outputs/demo/selected/selected.json",
    samples=39,  # as many as the demo's `select --top_percent 80` keeps
)

_PAPER_SELECTOR_OVERLAY = {
    "model": {"init_args": {"backbone": "tiny:tiny-clip"}},
    "data": {
        "init_args": {
            "pool": {
                "class_path": "biomedvital.data.pool.DemoPool",
                "init_args": {"root": "data/demo"},
            },
            "model_pairs": 128,
            "val_model_pairs": 32,
            "clinician_train_pairs": 8,
            "num_workers": 2,
        }
    },
    "trainer": {
        "max_epochs": 2,
        "accelerator": "cpu",
        **_NO_BAR,
        # step checkpoints as well, so that a mid-epoch kill resumes mid-epoch
        "callbacks": [
            _checkpoints(
                monitor="val/align_rate", mode="max", save_last=True, every_n_train_steps=2
            ),
            {"class_path": "biomedvital.selection.ScoreWriter"},
        ],
    },
}
PAPER_SELECTOR = Setup(
    "paper_selector",
    ("conf/paper/selector.yaml",),
    _PAPER_SELECTOR_OVERLAY,
    root="outputs/paper/selector",
    # 3 batches an epoch, checkpoints every 2 steps: (1, 2) resumes after batch 0 of epoch 1
    kills=((1, 0), (1, 2)),
)
FROZEN = Setup(
    "ablation_frozen",
    ("conf/paper/selector.yaml", "conf/ablation/frozen.yaml"),
    _PAPER_SELECTOR_OVERLAY,
    root="outputs/paper/selector",
    kills=((1, 0), (1, 2)),
)
RANKNET = Setup(
    "ablation_ranknet",
    ("conf/paper/selector.yaml", "conf/ablation/ranknet.yaml"),
    _PAPER_SELECTOR_OVERLAY,
    root="outputs/paper/selector",
    kills=((1, 0), (1, 2)),
)
PAPER_TUNER_FSDP2 = Setup(
    "paper_tuner_fsdp2",
    ("conf/paper/tuner.yaml",),
    {
        "model": {"init_args": {"model": "tiny:tiny-llava"}},
        "data": {
            "init_args": {"image_root": "data/demo/images", "batch_size": 1, "num_workers": 2}
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "max_epochs": 2,
            **_NO_BAR,
            "strategy": {"init_args": {"data_parallel_size": 2}},
            "callbacks": [
                _checkpoints(save_last=True, every_n_train_steps=1),
                {"class_path": "biomedvital.tuning.ExportTuned"},
            ],
        },
    },
    root="outputs/paper/tuner",
    # 6 micro-batches a rank, accumulation 4: steps after batches 3 and 5 of each epoch;
    # (1, 5) resumes from step 3, after batch 3 of epoch 1, and trains batches 4-5 again
    kills=((1, 0), (1, 5)),
    selected="outputs/paper/selected/selected.json",
    sharded=True,
)

CI_SETUPS = (DEMO_SELECTOR, DEMO_TUNER)
SLOW_SETUPS = (
    DEMO_SELECTOR,
    DEMO_TUNER,
    PAPER_SELECTOR,
    FROZEN,
    RANKNET,
    PAPER_TUNER_FSDP2,
    DEMO_SELECTOR_FULL,
    DEMO_TUNER_FULL,
)


def demo_conversations(demo: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` demo candidates, taking each image in turn: a tuner's training data."""
    rows = [json.loads(x) for x in (demo / "candidates.jsonl").read_text().splitlines()]
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    picked: list[dict[str, Any]] = []
    while len(picked) < min(n, len(rows)):
        for group in by_image.values():
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked


def prepare_run(run: Path, setup: Setup, data: Path, store: Path) -> Path:
    """A run folder for ``setup``: ``data`` linked, the empty MLflow ``store`` copied, the
    tuner's data written, the overlay written."""
    run.mkdir(parents=True)
    (run / "data").symlink_to(data, target_is_directory=True)
    shutil.copytree(store, run / "mlruns")
    if setup.selected is not None:
        path = run / setup.selected
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(demo_conversations(data / "demo", setup.samples), indent=1))
    (run / "overlay.yaml").write_text(yaml.safe_dump(setup.overlay, sort_keys=False))
    return run
