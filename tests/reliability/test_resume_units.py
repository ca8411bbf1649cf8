"""The pieces of an exact resume, in isolation: the training loader takes its place in the epoch
when the first batch is asked for, whatever the worker count; a sharded checkpoint folder is
swapped in so that a kill at any instant leaves one whole checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from biomedvital.selection.samplers import EpochShuffle, PairLoader, PairPositions
from biomedvital.tracking.checkpoints import _swap_in, recover_swaps


def _order(epoch: int, n: int = 12, seed: int = 3) -> list[int]:
    return torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    ).tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_takes_the_trainers_place_when_the_first_batch_is_asked_for(workers: int) -> None:
    """Lightning calls ``iter`` before ``set_epoch``, and a multi-worker iterator draws its
    prefetch as it is built: the place (epoch 1, 1 batch trained) must win over whatever the
    sampler was set to between ``iter`` and the first ``next``."""
    place = {"now": (1, 1)}
    loader = PairLoader(
        PairPositions(list(range(12))),
        sampler=EpochShuffle(12, seed=3),
        batch_size=4,
        num_workers=workers,
        progress=lambda: place["now"],
    )
    it = iter(loader)
    loader.sampler.set_epoch(0)  # stale: what a resumed run's first set_epoch may say
    got = [b.tolist() for b in it]
    want = _order(1)
    assert got == [want[4:8], want[8:12]]
    place["now"] = (1, 3)  # a finished epoch: the next starts from its first batch
    assert [b.tolist() for b in loader] == [_order(2)[i : i + 4] for i in (0, 4, 8)]


def _folder(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / "shard").write_text(tag)
    return path


def test_a_sharded_checkpoint_is_swapped_in_whole(tmp_path: Path) -> None:
    target = _folder(tmp_path / "last.ckpt", "step 1")
    _swap_in(_folder(tmp_path / ".last.ckpt.0123456789ab.tmp", "step 2"), target)
    assert (target / "shard").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_swap_killed_between_its_renames_is_undone(tmp_path: Path) -> None:
    """Killed after the old folder was set aside, before the new one took its name: the old
    one comes back (the new one is a temporary the output lock removes)."""
    _folder(tmp_path / ".last.ckpt.old", "step 1")
    recover_swaps(tmp_path)
    assert (tmp_path / "last.ckpt" / "shard").read_text() == "step 1"
    assert not (tmp_path / ".last.ckpt.old").exists()


def test_a_swap_killed_before_removing_the_old_folder_is_finished(tmp_path: Path) -> None:
    _folder(tmp_path / "last.ckpt", "step 2")
    _folder(tmp_path / ".last.ckpt.old", "step 1")
    recover_swaps(tmp_path)
    assert (tmp_path / "last.ckpt" / "shard").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
