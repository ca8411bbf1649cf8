"""Pairwise ranking losses: entry ``a`` of each pair should score above entry ``b``."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["hinge", "ranknet"]


def pair_loss(
    name: LossName,
    score_a: torch.Tensor,
    score_b: torch.Tensor,
    logit_a: torch.Tensor,
    logit_b: torch.Tensor,
    margin: float = 1.0,
) -> torch.Tensor:
    """Per-pair loss.

    ``hinge`` (paper): ``max(0, margin - (s_a - s_b))`` on sigmoid scores. With margin 1 and
    scores in (0, 1) it never saturates, so it acts as a linear push on the score gap.
    ``ranknet``: ``-log sigmoid(z_a - z_b)`` on the logits, the logistic loss the released code
    defines but does not use.
    """
    if name == "hinge":
        return torch.clamp(margin - (score_a - score_b), min=0.0)
    if name == "ranknet":
        return F.softplus(-(logit_a - logit_b))
    raise ValueError(f"unknown loss {name!r}; use 'hinge' or 'ranknet'")
