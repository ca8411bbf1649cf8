"""Batches for instruction tuning: modality- and length-grouped, padded, images decoded in workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from biomedvital.data.images import ImageLoadError, ImageRoot, UnsafePathError
from biomedvital.data.loaders import ResumableLoader
from biomedvital.tuning.conversation import IGNORE_INDEX

IMAGE_ERRORS = (ImageLoadError, UnsafePathError, FileNotFoundError, OSError)


@dataclass
class Sample:
    """One tokenised training sample; ``position`` locates it in the source file."""

    id: str
    image: str
    input_ids: np.ndarray
    labels: np.ndarray
    modality: str
    position: int

    def __len__(self) -> int:
        return len(self.input_ids)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of one modality and similar length, so little of each batch is padding.

    As LLaVA's ``group_by_modality_length``: per modality, a permutation is cut into megabatches
    of ``megabatch`` global batches (a short last one joins the one before, rather than forming
    unsorted batches of its own), each sorted by length and cut into global batches; global
    batches of all modalities are then shuffled. The order depends only on (seed, epoch), so a
    resumed run sees the batches of one that never stopped. With several processes each global
    batch (``batch_size * num_replicas``) is split between ranks, so every rank takes a step on
    samples of similar length and the global batch is the same whatever the process count.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        groups: Sequence[str],
        batch_size: int,
        seed: int = 0,
        megabatch: int = 8,
        shuffle: bool = True,
        longest_first: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        split: Literal["fixed", "min_padding"] = "fixed",
    ) -> None:
        if batch_size < 1 or megabatch < 1:
            raise ValueError("batch_size and megabatch must be >= 1")
        if split not in ("fixed", "min_padding"):
            raise ValueError(f"split must be 'fixed' or 'min_padding', got {split!r}")
        self.split = split
        self.lengths, self.groups = list(lengths), list(groups)
        self.batch_size, self.seed, self.megabatch = batch_size, seed, megabatch
        self.shuffle, self.longest_first = shuffle, longest_first
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._skip = 0

    @property
    def sampler(self) -> GroupedBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on a loader's ``batch_sampler.sampler`` when
        an epoch starts, and this order depends on the epoch (without it every epoch would
        train on the same batches)."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue a run stopped in ``epoch`` after ``batches_done`` of its batches (this
        rank's): the next iteration yields the rest of that epoch; a finished epoch resumes
        at the start of the next."""
        if batches_done >= len(self):
            epoch, batches_done = epoch + 1, 0
        self.epoch, self._skip = epoch, batches_done

    def global_batches(self) -> list[list[int]]:
        """Every rank's samples of each step, in step order."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        step = self.batch_size * self.num_replicas
        out: list[list[int]] = []
        for group in sorted(set(self.groups)):
            idx = [i for i, m in enumerate(self.groups) if m == group]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            mb = step * self.megabatch
            starts = list(range(0, len(idx), mb))
            if len(starts) > 1 and len(idx) - starts[-1] < mb:
                starts.pop()  # a short last megabatch is sorted with the one before it
            for k, end in zip(starts, [*starts[1:], len(idx)], strict=True):
                chunk = sorted(idx[k:end], key=lambda i: -self.lengths[i])
                if self.split == "min_padding":
                    sizes = min_padding_sizes(
                        [self.lengths[i] for i in chunk], step, self.num_replicas
                    )
                    cuts = np.cumsum([0, *sizes]).tolist()
                    out += [chunk[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
                else:
                    out += [chunk[j : j + step] for j in range(0, len(chunk), step)]
        if self.shuffle and out:
            out = [out[j] for j in torch.randperm(len(out), generator=g).tolist()]
        if self.longest_first and out:
            # the largest batch first: a run that would run out of memory does so at once
            top = max(range(len(out)), key=lambda b: (max(self.lengths[i] for i in out[b]), -b))
            out.insert(0, out.pop(top))
        return out

    def step_batches(self) -> list[list[int]]:
        """Every rank's samples of each step as trained: a short global batch is padded with
        repeats (as DistributedSampler pads) so each rank gets an equal share."""
        out = []
        for batch in self.global_batches():
            if len(batch) % self.num_replicas:
                pad = self.num_replicas - len(batch) % self.num_replicas
                batch = batch + [batch[i % len(batch)] for i in range(pad)]
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        for batch in self.step_batches()[skip:]:
            per = len(batch) // self.num_replicas
            yield batch[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        step = self.batch_size * self.num_replicas
        total = 0
        for group in set(self.groups):
            n = sum(1 for m in self.groups if m == group)
            mb = step * self.megabatch
            full, rest = divmod(n, mb)
            total += full * self.megabatch + -(-rest // step)
        return total


def min_padding_sizes(lengths_desc: Sequence[int], max_size: int, unit: int = 1) -> list[int]:
    """Batch sizes cutting a length-sorted (longest first) run into ``ceil(n / max_size)``
    contiguous batches with the fewest pad tokens (exact, by dynamic programming).

    The number of batches, hence of optimiser steps and the learning-rate schedule, is that of
    fixed-size batches; sizes vary between ``unit`` and ``max_size``: a long tail sample no longer
    forces three shorter ones to pad up to it. Every size is a multiple of ``unit`` (the process
    count, so each rank gets an equal share) except the last batch's, which takes the remainder.
    """
    n = len(lengths_desc)
    if n == 0:
        return []
    lengths = np.asarray(lengths_desc, dtype=np.int64)
    if np.any(lengths[:-1] < lengths[1:]):
        raise ValueError("lengths must be sorted longest first")
    k_total = -(-n // max_size)
    inf = np.iinfo(np.int64).max // 4
    cost = np.full(n + 1, inf, dtype=np.int64)  # cost[i]: best padded tokens of the first i
    cost[0] = 0
    choice = np.zeros((k_total + 1, n + 1), dtype=np.int64)
    for k in range(1, k_total + 1):
        new = np.full(n + 1, inf, dtype=np.int64)
        for size in range(1, min(max_size, n) + 1):
            # a batch of `size` ending at i costs lengths[i - size] * size (its longest sample)
            cand = cost[: n + 1 - size] + lengths[: n + 1 - size] * size
            end = np.arange(size, n + 1)
            if size % unit:
                cand, end = cand[-1:], end[-1:]  # only the last batch may break the unit
            better = cand < new[end]
            new[end[better]] = cand[better]
            choice[k, end[better]] = size
        cost = new
    sizes, i = [], n
    for k in range(k_total, 0, -1):
        sizes.append(int(choice[k, i]))
        i -= sizes[-1]
    if i != 0 or cost[n] >= inf:  # cannot happen for unit <= max_size; a guard, not a path
        raise AssertionError("min_padding_sizes found no split")
    return sizes[::-1]


class GroupedLoader(ResumableLoader):
    """The tuner's training loader: resumable (:class:`~biomedvital.data.loaders.
    ResumableLoader`) over a :class:`GroupedBatchSampler` (``batch_sampler``), which skips the
    batches already trained."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, progress=progress, **kwargs)
        if not isinstance(self.batch_sampler, GroupedBatchSampler):
            raise TypeError("GroupedLoader needs a GroupedBatchSampler as batch_sampler")

    def resume(self, epoch: int, batches_done: int) -> None:
        self.batch_sampler.resume(epoch, batches_done)  # type: ignore[union-attr]


class TuningDataset(Dataset):
    """Samples with their images decoded and preprocessed (in DataLoader workers)."""

    def __init__(
        self, samples: list[Sample], root: ImageRoot, image_processor: Any, skip_bad: bool
    ) -> None:
        self.samples, self.root = samples, root
        self.image_processor, self.skip_bad = image_processor, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        try:
            image = self.root.load(s.image)
        except IMAGE_ERRORS as err:
            if not self.skip_bad:
                raise BadSampleImage(s, err) from err
            # a blank image of the right shape: the collate may need the sample as a placeholder
            blank = Image.new("RGB", (32, 32))
            pixels = self.image_processor(images=blank, return_tensors="pt")["pixel_values"][0]
            return {"sample": s, "error": f"{type(err).__name__}: {err}", "pixel_values": pixels}
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"sample": s, "pixel_values": pixels}


class BadSampleImage(ValueError):
    """An image that fails to decode while training; names the sample and its record."""

    def __init__(self, sample: Sample, cause: BaseException) -> None:
        super().__init__(
            f"record {sample.position} (id {sample.id!r}): image {sample.image!r}: "
            f"{type(cause).__name__}: {cause}"
        )


class PadCollate:
    """Right-pads ids (``pad_id``) and labels (``IGNORE_INDEX``) to the batch's longest sample.

    Samples whose image failed to load (skip mode) are left out and named in ``bad_ids``.
    When all of a batch's did, one stays as a placeholder: its blank image and tokens with no
    label, so that the step still runs the model (with several processes every rank must take
    part in the step's collectives) and adds nothing to the loss; ``ids`` lists the good
    samples only.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        bad = [it for it in items if "error" in it]
        good = [it for it in items if "error" not in it]
        rows = good or bad[:1]  # the placeholder: supervised by nothing (below)
        n, width = len(rows), max((len(it["sample"]) for it in rows), default=0)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, it in enumerate(rows):
            s: Sample = it["sample"]
            ids[row, : len(s)] = torch.from_numpy(s.input_ids)
            if good:
                labels[row, : len(s)] = torch.from_numpy(s.labels)
            mask[row, : len(s)] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in rows])
            if rows
            else torch.empty(0),
            "ids": [it["sample"].id for it in good],
            "bad_ids": [it["sample"].id for it in bad],
        }
