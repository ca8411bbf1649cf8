"""Run records: the resolved config and a self-description, in MLflow and in the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from biomedvital.data.jsonio import atomic_write, write_json
from biomedvital.tracking.provenance import git_state


def _trained_by(ckpt_path: str | None) -> str | None:
    """The MLflow run that wrote a checkpoint (memory-mapped: no tensor is read)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get("mlflow_run_id")


class RecordRun(SaveConfigCallback):
    """Logs the resolved config as an MLflow artifact and writes ``run.json`` + ``config.yaml``
    into the trainer's ``default_root_dir``.

    Lightning's own ``SaveConfigCallback`` writes into ``trainer.log_dir``, which MLflow does not
    have; this one stores the config where the run's other artifacts are.
    """

    def __init__(self, parser: Any, config: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        text = self.parser.dump(self.config, skip_none=False)
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / f"config.{stage}.yaml") as f:
            f.write(text)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(text, f"config.{stage}.yaml")

    def _tag_upstream(self, trainer: Trainer) -> None:
        # the checkpoint is restored after setup: tag once the loop starts
        logger = trainer.logger
        upstream = _trained_by(trainer.ckpt_path)
        if trainer.is_global_zero and upstream and logger is not None and hasattr(logger, "run_id"):
            logger.experiment.set_tag(logger.run_id, "upstream_run", upstream)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag_upstream(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag_upstream(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._tag_upstream(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._describe(trainer, pl_module, "fit")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._describe(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._describe(trainer, pl_module, "test")

    def _describe(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        record = {
            "stage": stage,
            "git": git_state(),
            "mlflow_run_id": getattr(trainer.logger, "run_id", None),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "data": dm.describe() if hasattr(dm, "describe") else {},
            "dropped_pairs": getattr(pl_module, "dropped_pairs", 0),
            "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        }
        write_json(Path(trainer.default_root_dir) / f"run.{stage}.json", record)
        if trainer.logger is not None and hasattr(trainer.logger, "log_dict"):
            trainer.logger.log_dict(record, f"run.{stage}.json")
