"""BatchShards: whole batches dealt round-robin, every item once, none padded."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from biomedvital.evaluation.sharding import BatchShards, TooFewBatchesError


@pytest.mark.parametrize(("n", "batch", "world"), [(30, 16, 2), (31, 4, 3), (8, 1, 8), (9, 3, 2)])
def test_shards_are_the_one_process_batches(n: int, batch: int, world: int) -> None:
    data = list(range(n))
    one = [b.tolist() for b in DataLoader(data, batch_size=batch)]
    shards = [
        [
            b.tolist()
            for b in DataLoader(data, batch_size=batch, sampler=BatchShards(data, batch, world, r))
        ]
        for r in range(world)
    ]
    assert sorted(b for s in shards for b in s) == one  # the same batches, each once
    for r, s in enumerate(shards):
        assert s == one[r::world]
        assert len(BatchShards(data, batch, world, r)) == sum(map(len, s))


def test_more_processes_than_batches_is_refused() -> None:
    with pytest.raises(TooFewBatchesError, match="5 items, batch size 4: 2 batch.*4 processes"):
        BatchShards(list(range(5)), 4, 4, 0)


def test_lightning_keeps_it() -> None:
    """A DistributedSampler subclass: Lightning's test loop does not inject its own."""
    from torch.utils.data import DistributedSampler

    assert isinstance(BatchShards(list(range(4)), 2, 2, 1), DistributedSampler)
