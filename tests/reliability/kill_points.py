"""A callback that SIGKILLs its own run at a chosen batch: a kill at an exact place in training
or inference, where a timer lands wherever the machine's speed puts it.

Added to the run being killed only (``--trainer.callbacks+=`` :func:`kill_at_arg`); it kills
the run's whole process group (DataLoader workers and, under a multi-process strategy, the
other ranks) as the OOM killer or a preemption would: no hook, ``finally`` or ``atexit`` runs.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from lightning.pytorch import Callback


class KillAt(Callback):
    """SIGKILL the process group when batch ``batch`` of epoch ``epoch`` is about to run.

    Args:
        stage: ``train``, ``predict`` or ``test``: whose batches count.
        epoch: the training epoch (ignored for ``predict`` and ``test``).
        batch: the batch (micro-batch for training) index within the epoch.
    """

    def __init__(self, stage: str = "train", epoch: int = 0, batch: int = 0) -> None:
        if stage not in ("train", "predict", "test"):
            raise ValueError(f"stage must be train, predict or test, got {stage!r}")
        self.stage, self.epoch, self.batch = stage, epoch, batch

    def _maybe_kill(self, stage: str, epoch: int, batch_idx: int) -> None:
        if stage == self.stage and epoch == self.epoch and batch_idx == self.batch:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_kill("train", trainer.current_epoch, batch_idx)

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_kill("predict", self.epoch, batch_idx)

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_kill("test", self.epoch, batch_idx)


def kill_at_arg(stage: str = "train", epoch: int = 0, batch: int = 0) -> list[str]:
    """Command-line arguments that add a :class:`KillAt` to a trainer verb's callbacks."""
    spec = {
        "class_path": "kill_points.KillAt",
        "init_args": {"stage": stage, "epoch": epoch, "batch": batch},
    }
    return [f"--trainer.callbacks+={json.dumps(spec)}"]
