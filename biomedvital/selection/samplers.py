"""What the selector's pair loaders iterate: positions in a pair set, their training order, and
the training loader that checkpoints its place in that order.

The order depends only on (seed, epoch): a run resumed from a checkpoint, even one written
mid-epoch, trains the batches of a run that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from biomedvital.data.loaders import ResumableLoader
from biomedvital.selection.pairs import Pair


class PairPositions(Dataset):
    """Positions in a pair set: the collate looks the pairs up, and a dropped pair is named by
    its position, so that it is counted once however many epochs meet it."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> int:
        return i


class EpochShuffle(DistributedSampler):
    """A permutation that depends only on (seed, epoch), so a run resumed from a checkpoint
    sees the same batches as one that never stopped (Lightning calls ``set_epoch``).

    With several processes each takes every ``num_replicas``-th index of the permutation,
    padded with its first indices to an equal share (as ``DistributedSampler`` does): being a
    ``DistributedSampler``, Lightning leaves it unwrapped, so that :meth:`resume` can skip the
    batches a process already trained.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.n, self.seed, self.epoch = n, seed, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """Continue ``epoch`` after ``samples_done`` of this process's samples: the next
        iteration yields the rest; a finished epoch resumes at the start of the next."""
        if samples_done >= self.num_samples:
            epoch, samples_done = epoch + 1, 0
        self.epoch, self._skip = epoch, samples_done

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas > 1 and order:
            pad = self.total_size - len(order)
            order += (order * -(-pad // len(order)))[:pad]
        skip, self._skip = self._skip, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])


class PairLoader(ResumableLoader):
    """The selector's training loader: resumable (:class:`~biomedvital.data.loaders.
    ResumableLoader`) over an :class:`EpochShuffle`, which skips the samples already trained."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, progress=progress, **kwargs)
        if not isinstance(self.sampler, EpochShuffle):
            raise TypeError("PairLoader needs an EpochShuffle sampler")

    def resume(self, epoch: int, batches_done: int) -> None:
        self.sampler.resume(epoch, batches_done * int(self.batch_size or 1))  # type: ignore[attr-defined]
