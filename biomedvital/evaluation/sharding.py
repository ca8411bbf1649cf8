"""Whole batches dealt round-robin to the processes of an evaluation run.

Lightning's default for ``test`` is ``DistributedSampler``, which pads the last round with
repeated items (so some questions are answered and scored twice) and deals single items, so a
batch's composition (and, with left padding, its numerics) depends on the number of processes.
:class:`BatchShards` deals whole batches of the one-process order instead: the union of the
ranks' batches is exactly the one-process run's batches, none repeated, none dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sized

from torch.utils.data import DistributedSampler


class TooFewBatchesError(ValueError):
    """More processes than batches: a process with nothing to do would hang the others."""


def batches_to_answer(n_batches: int, done: Collection[int], num_replicas: int) -> list[int]:
    """The batches a run answers: those not ``done`` (by a killed run), but at least one per
    process, taking back the last done ones (a process without a batch would skip the epoch's
    end, where the answers are gathered and written)."""
    if n_batches < num_replicas:
        raise TooFewBatchesError(
            f"{n_batches} batch(es) for {num_replicas} processes: every process needs at least "
            "one; lower the batch size or the number of devices"
        )
    todo = [b for b in range(n_batches) if b not in done]
    redo = sorted((b for b in range(n_batches) if b in done), reverse=True)
    while len(todo) < num_replicas:
        todo.append(redo.pop(0))
    return sorted(todo)


class BatchShards(DistributedSampler):
    """Indices of this process's share of the batches to answer, in order, unpadded.

    The batches (of the one-process run: batch ``b`` is items ``b·batch_size`` onwards) that a
    run answers are dealt round-robin. Used with ``DataLoader(batch_size=batch_size,
    shuffle=False)``: since every share is a run of whole batches, consecutive ``batch_size``
    indices are exactly one of the one-process batches. A ``DistributedSampler`` subclass, so
    Lightning keeps it instead of injecting its own.

    Args:
        dataset: the evaluated dataset (only its length is used).
        batch_size: the DataLoader's batch size.
        num_replicas: number of processes.
        rank: this process's global rank.
        done: batches answered already (by a killed run: see ``answer_journal``), skipped.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int,
        rank: int,
        done: Collection[int] = frozenset(),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.n_items = len(dataset)
        n_batches = -(-self.n_items // batch_size)
        try:
            todo = batches_to_answer(n_batches, done, num_replicas)
        except TooFewBatchesError as err:
            raise TooFewBatchesError(
                f"{self.n_items} items, batch size {batch_size}: {err}"
            ) from None
        self.batches = todo[rank::num_replicas]

    def __iter__(self) -> Iterator[int]:
        for b in self.batches:
            yield from range(b * self.batch_size, min((b + 1) * self.batch_size, self.n_items))

    def __len__(self) -> int:
        return sum(
            min((b + 1) * self.batch_size, self.n_items) - b * self.batch_size for b in self.batches
        )
