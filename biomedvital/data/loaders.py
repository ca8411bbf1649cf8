"""A training DataLoader that continues where a checkpoint left off, whatever its worker count.

A resumed run must train each epoch's remaining batches in the order of a run that never
stopped. The order depends only on (seed, epoch) (the samplers); the place in it is Lightning's
own checkpointed counters: the epoch under way and how many of its batches were trained.

When the sampler reads them matters. Lightning builds the epoch's iterator (``iter(loader)``)
before it calls the sampler's ``set_epoch``, and on a resume from a checkpoint written at an
epoch's end it never calls ``load_state_dict`` (it considers that epoch finished, not
restarting). With ``num_workers`` 0 nothing is drawn from the sampler until the first batch is
asked for, by which time the epoch is set; with workers the iterator draws indices for its
prefetch at once, and a resumed run trained the finished epoch's order again. Here the iterator
is built when the first batch is asked for, and the sampler is placed first from the trainer's
counters, final at that instant in every case (fresh epoch, mid-epoch restart, resume at an
epoch's end): the batches are the same with any ``num_workers``, and a run killed with 4
workers and resumed with 2 continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """``DataLoader`` whose sampler is placed at the trainer's (epoch, batches trained) when the
    epoch's first batch is asked for (:meth:`resume`), before any worker prefetches.

    Args:
        progress: returns (epoch, batches of it trained) (:func:`trained_batches` of the
            trainer); read when an epoch's first batch is asked for and when a checkpoint is
            written.
        Others: ``DataLoader``'s.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def __iter__(self) -> Iterator[Any]:
        return _Deferred(self)

    def _start(self) -> Iterator[Any]:
        epoch, done = self.progress()
        self.resume(int(epoch), int(done))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """The place in the epoch, saved with each checkpoint (a record: a resumed run reads
        Lightning's restored counters, which hold the same place)."""
        epoch, done = self.progress()
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Accepted and not applied: Lightning skips this call on a resume at an epoch's end,
        so the place is read from its counters instead (:meth:`__iter__`)."""

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration continue ``epoch`` after ``batches_done`` batches (a finished
        epoch: the start of the next)."""
        raise NotImplementedError


class _Deferred(Iterator[Any]):
    """The loader's iterator, built at the first ``next``: Lightning calls ``iter`` before it
    sets the sampler's epoch, and a multi-worker iterator draws indices as it is built."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader
        self.it: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.it is None:
            self.it = self.loader._start()
        return next(self.it)

    def __len__(self) -> int:
        return len(self.loader)


def trained_batches(trainer: Any) -> tuple[int, int]:
    """The epoch under way and how many of its (micro-)batches were trained: Lightning's own
    counters (restored from the checkpoint on a resume)."""
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
