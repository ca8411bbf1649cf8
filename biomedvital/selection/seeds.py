"""The selector's seeds: pinned in the config, or following the run's global seed."""

from __future__ import annotations

import os

SEED_ENV = "PL_GLOBAL_SEED"  # where Lightning's ``seed_everything`` keeps the seed it set


def resolve_seed(seed: int | None) -> int:
    """``seed``, or when ``None`` the run's global seed (``seed_everything``; 0 when unset).

    The selector draws from its own seeded generators, not the global RNG, so that a config
    gives the same model whatever else consumed the RNG; following ``seed_everything`` by
    default is what makes ``--seed_everything`` and a grid's seed replicates change its runs.
    """
    if seed is not None:
        return int(seed)
    value = os.environ.get(SEED_ENV)
    if value is None or not value.strip():
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r} is not an integer seed") from None
