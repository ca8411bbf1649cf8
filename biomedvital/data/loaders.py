"""A training DataLoader whose place in its epoch goes into Lightning's checkpoints.

Lightning saves a loader's ``state_dict`` with each checkpoint and hands it back to
``load_state_dict`` on ``fit --ckpt_path``, before the epoch's iterator is built. Saved: the
epoch and how many of its batches were trained; restored, the sampler skips them, so a run
resumed from a checkpoint written mid-epoch (``every_n_train_steps``) trains the rest of that
epoch in the order of a run that never stopped, instead of starting it over. The selector and
the tuner share it; each says how its sampler skips (:meth:`ResumableLoader.resume`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """``DataLoader`` plus a checkpointed (epoch, batches trained).

    Args:
        progress: returns (epoch, batches of it trained) when a checkpoint is written
            (:func:`trained_batches` of the trainer).
        Others: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress()
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume(int(state["epoch"]), int(state["batches_done"]))

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration continue ``epoch`` after ``batches_done`` batches."""
        raise NotImplementedError


def trained_batches(trainer: Any) -> tuple[int, int]:
    """The epoch under way and how many of its (micro-)batches were trained: Lightning's own
    counters, read when a checkpoint is written (after the batch's step)."""
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
