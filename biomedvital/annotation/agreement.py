"""Inter-annotator agreement: Cohen's kappa between two annotators on the items both judged.

kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the agreement expected
from each annotator's own label frequencies. When p_e = 1 (both used one and the same label
throughout) kappa is undefined and reported as ``None`` next to the raw agreement, rather than as
a misleading 0 or 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two equally long label sequences; None when empty or undefined."""
    if len(a) != len(b):
        raise ValueError(f"label sequences differ in length ({len(a)} vs {len(b)})")
    n = len(a)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca.keys() | cb.keys()) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def agreement(a: Sequence[Hashable], b: Sequence[Hashable]) -> dict[str, Any]:
    """``{"n", "agreement", "kappa"}`` for two label sequences (agreement = share of equal labels)."""
    n = len(a)
    return {
        "n": n,
        "agreement": None if n == 0 else sum(x == y for x, y in zip(a, b, strict=True)) / n,
        "kappa": cohen_kappa(a, b),
    }
