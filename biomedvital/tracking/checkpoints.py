"""Checkpoints inside the run's own output folder, so that every folder describes itself."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoints(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose folder defaults to ``<default_root_dir>/checkpoints``.

    With MLflow, Lightning would otherwise put checkpoints under a per-run id, where
    ``--ckpt_path last`` cannot find them after a restart and a grid cannot tell its cells apart.
    Every argument is ``ModelCheckpoint``'s.
    """

    def _default_dir(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._default_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # ``--ckpt_path last`` is resolved before ``setup``: the folder must be known here too
        self._default_dir(trainer)
        return super()._find_last_checkpoints(trainer)
