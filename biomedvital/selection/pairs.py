"""Training and validation pairs for the selector.

Model pairs follow the paper: candidates are grouped by rating level; a pair takes one item
from each of two different levels, the better-rated one preferred. Within each level the first
``train_fraction`` of the items (file order) feed training pairs and the rest validation pairs,
so no candidate appears on both sides. Clinician pairs are split into train and held-out
validation, by image by default so that no figure leaks across the split.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np

MODEL, CLINICIAN = 0, 1


@dataclass(frozen=True)
class Pair:
    """Entry ``a`` should score above entry ``b``; ``kind`` is MODEL or CLINICIAN."""

    a: int
    b: int
    kind: int


def split_levels(
    scores: list[float], train_fraction: float
) -> tuple[dict[float, list[int]], dict[float, list[int]]]:
    """Group item indices by score level and cut each level into a train and a val part."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    levels: dict[float, list[int]] = defaultdict(list)
    for i, s in enumerate(scores):
        levels[float(s)].append(i)
    train, val = {}, {}
    for level, items in sorted(levels.items()):
        cut = int(round(len(items) * train_fraction))
        if len(items) > 1:
            cut = min(max(cut, 1), len(items) - 1) if train_fraction < 1.0 else len(items)
        train[level] = items[:cut]
        if items[cut:]:
            val[level] = items[cut:]
    return train, val


def drop_repeats(
    train: dict[float, list[int]], val: dict[float, list[int]], key: Callable[[int], Hashable]
) -> tuple[dict[float, list[int]], int]:
    """``val`` without the items whose content (``key``) a training item has too.

    Two candidates with one image and one selector text (a repeated generation; under the
    ``paper`` recipe, conversations that differ only after the first turn) are one input: split
    across the cut, the held-out pairs would score what the selector trained on. The released
    code likewise refuses a test item equal to a training one. Returns the rest and how many
    items were dropped; a level left empty is removed.
    """
    seen = {key(i) for items in train.values() for i in items}
    kept: dict[float, list[int]] = {}
    dropped = 0
    for level, items in val.items():
        rest = [i for i in items if key(i) not in seen]
        dropped += len(items) - len(rest)
        if rest:
            kept[level] = rest
    return kept, dropped


def sample_model_pairs(
    levels: dict[float, list[int]], n: int, rng: np.random.Generator
) -> list[Pair]:
    """Draw ``n`` pairs (with replacement) across two different levels, better one first."""
    keys = [k for k, v in levels.items() if v]
    if n == 0:
        return []
    if len(keys) < 2:
        raise ValueError(
            f"model pairs need candidates at two or more rating levels; found {len(keys)} "
            f"level(s) {keys}. Rate more candidates or set model_pairs: 0"
        )
    pairs = []
    for _ in range(n):
        hi, lo = sorted(rng.choice(len(keys), size=2, replace=False), key=lambda i: -keys[i])
        a = levels[keys[hi]][rng.integers(len(levels[keys[hi]]))]
        b = levels[keys[lo]][rng.integers(len(levels[keys[lo]]))]
        pairs.append(Pair(a, b, MODEL))
    return pairs


def split_clinician(
    groups: list[str],
    val_fraction: float,
    rng: np.random.Generator,
    train_pairs: int | None = None,
) -> tuple[list[int], list[int]]:
    """Indices of clinician pairs for training and held-out validation.

    ``groups`` holds one label per pair (its image for a by-image split, the id of its
    preference record for a by-pair split: see :func:`preference_record`); whole groups go to
    one side. ``train_pairs`` (the paper: 50) sets the training side's size instead of
    ``val_fraction``: whole groups, drawn in random order, are added until it holds at least
    that many pairs (exactly that many when each group holds one pair); the rest is held out.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"clinician_val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(groups))
    order = rng.permutation(len(unique))
    if train_pairs is not None:
        if train_pairs < 1:
            raise ValueError(f"clinician_train_pairs must be at least 1, got {train_pairs}")
        if groups and train_pairs >= len(groups):
            raise ValueError(
                f"clinician_train_pairs {train_pairs} leaves none of the {len(groups)} "
                "clinician pairs held out to measure alignment"
            )
        size = {g: 0 for g in unique}
        for g in groups:
            size[g] += 1
        train_groups: set[str] = set()
        taken = 0
        for i in order:
            if taken >= train_pairs:
                break
            train_groups.add(unique[i])
            taken += size[unique[i]]
        val_groups = set(unique) - train_groups
    else:
        n_val = int(round(len(unique) * val_fraction))
        if val_fraction > 0 and len(unique) > 1:
            n_val = min(max(n_val, 1), len(unique) - 1)
        val_groups = {unique[i] for i in order[:n_val]}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val


ClinicianSplit = Literal["image", "pair"]

_EXPANDED = re.compile(r"#\d+>\d+$")


def preference_record(pref_id: str) -> str:
    """The id of the record a preference comes from, its by-pair split group.

    An answer-marks record expands into pairs ``f"{id}#{i}>{j}"`` that share its question and
    answers: split apart, the held-out side would score answers the model trained on.
    """
    return _EXPANDED.sub("", pref_id)
