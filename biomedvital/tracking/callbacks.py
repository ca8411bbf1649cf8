"""Run records: the resolved config and a self-description, in MLflow and in the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from biomedvital.data.jsonio import atomic_write, write_json
from biomedvital.tracking.hooks import (
    CountsDroppedPairs,
    HasUpstreamRuns,
    ReportsResolved,
    ReportsResume,
    TracksRun,
    describe,
)
from biomedvital.tracking.provenance import git_state


def _trained_by(ckpt_path: str | None) -> str | None:
    """The MLflow run that wrote a checkpoint (memory-mapped: no tensor is read)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    from biomedvital.tracking.checkpoints import load_checkpoint

    return load_checkpoint(ckpt_path, mmap=True).get("mlflow_run_id")


def lineage_tags(upstream: dict[str, list[str]], client: Any) -> dict[str, str]:
    """``upstream_<stage>`` tags (``upstream_generate``, ``upstream_rate``…) for the runs that
    wrote a data module's inputs; the stage is the run's MLflow name, else the file role."""
    tags: dict[str, list[str]] = {}
    for role, run_ids in upstream.items():
        for run_id in run_ids:
            try:
                name = client.get_run(run_id).info.run_name or role
            except Exception:  # a run of another store: the role still names it
                name = role
            tags.setdefault(f"upstream_{name}", []).append(run_id)
    return {k: ",".join(dict.fromkeys(v)) for k, v in tags.items()}


_END_METRICS = "biomedvital_fit_metrics"
_CALLBACK_METRICS = "biomedvital_callback_metrics"  # the same, as the trainer holds them


class EndOfFit(Callback):
    """A callback whose end-of-training output is also written when a rerun finds training done.

    A run killed after its last checkpoint but before ``on_train_end`` finished writing leaves
    a complete checkpoint and an incomplete output folder. ``--ckpt_path last`` then restores a
    finished loop, and Lightning skips the training loop, ``on_train_end`` included. Here the
    metrics are kept in every checkpoint, and such a rerun calls :meth:`end_of_fit` from
    ``on_fit_end`` with the metrics the interrupted run had, so its outputs match an
    uninterrupted run's.
    """

    def end_of_fit(
        self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]
    ) -> None:
        """Write the end-of-training outputs."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_ended = True
        self.end_of_fit(trainer, pl_module, _metrics(trainer))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ended, self._train_ended = getattr(self, "_train_ended", False), False
        if ended or not trainer.fit_loop.done:
            return
        metrics = getattr(self, "_restored_metrics", None)
        self.end_of_fit(trainer, pl_module, metrics if metrics is not None else _metrics(trainer))

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[_END_METRICS] = _metrics(trainer)
        checkpoint[_CALLBACK_METRICS] = {
            k: torch.as_tensor(v).detach().cpu().clone()
            for k, v in trainer.callback_metrics.items()
        }

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restored_metrics = checkpoint.get(_END_METRICS)
        self._restored_tensors = checkpoint.get(_CALLBACK_METRICS) or {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Logged metrics are not restored by Lightning: until its first validation a resumed run
        # had none of the last validation's, which an uninterrupted run still holds. Checkpoints
        # monitoring one were then deferred to another hook and ranked by the next validation,
        # and every checkpoint kept other metrics. They are put back from the checkpoint, as
        # tensors of their own dtype.
        restored = getattr(self, "_restored_tensors", None)
        if restored and trainer.ckpt_path is not None:
            metrics = trainer.callback_metrics  # Lightning's own dict, updated as runs log
            for key, value in restored.items():
                metrics.setdefault(key, value.to(pl_module.device))


def _metrics(trainer: Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


class RecordRun(SaveConfigCallback, EndOfFit):
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
        if trainer.is_global_zero and upstream and isinstance(logger, TracksRun):
            logger.experiment.set_tag(logger.run_id, "upstream_run", upstream)

    def _tag_data_lineage(self, trainer: Trainer) -> None:
        # the runs that wrote the data module's inputs (generated candidates, judge ratings)
        logger, dm = trainer.logger, trainer.datamodule
        if not trainer.is_global_zero or not isinstance(logger, TracksRun):
            return
        if isinstance(dm, HasUpstreamRuns):
            for key, value in lineage_tags(dm.upstream_runs(), logger.experiment).items():
                logger.experiment.set_tag(logger.run_id, key, value)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag_data_lineage(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag_upstream(trainer)
        self._tag_data_lineage(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tag_upstream(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._tag_upstream(trainer)

    def end_of_fit(
        self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]
    ) -> None:
        self._describe(trainer, pl_module, "fit", metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._describe(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._describe(trainer, pl_module, "test")

    def _describe(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        metrics: dict[str, float] | None = None,
    ) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        record = {
            "stage": stage,
            "git": git_state(),
            "mlflow_run_id": getattr(trainer.logger, "run_id", None),
            "metrics": _metrics(trainer) if metrics is None else metrics,
            "data": describe(dm),
            "dropped_pairs": (
                pl_module.dropped_pairs if isinstance(pl_module, CountsDroppedPairs) else 0
            ),
            "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        }
        resumed = pl_module.resumed if isinstance(pl_module, ReportsResume) else None
        if resumed:  # what a rerun took over from a killed run (e.g. journaled answers)
            record["resumed"] = resumed
        resolved = pl_module.resolved if isinstance(pl_module, ReportsResolved) else None
        if resolved:  # settings taken from what the model records (e.g. its preprocessing)
            record["resolved"] = resolved
        write_json(Path(trainer.default_root_dir) / f"run.{stage}.json", record)
        if trainer.logger is not None and hasattr(trainer.logger, "log_dict"):
            trainer.logger.log_dict(record, f"run.{stage}.json")
