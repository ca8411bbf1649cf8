"""The released selector's "global mean rank" of clinicians' preferred answers.

BioMed-VITAL reports it beside alignment rate, ROC-AUC and MAP on the held-out clinician pairs:
all answers (preferred and rejected) are sorted by score, best first, and the 0-based ranks of
the preferred ones are averaged and divided by the number of answers. Lower is better; with n
pairs a perfect ordering gives (n - 1) / 4n (just under 0.25), a random one about 0.5. Ties take
the mean of the ranks they span (the released code's sort leaves their order arbitrary).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def normalised_mean_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean 0-based descending rank of the ``positive`` entries of ``scores``, over their count.

    NaN when there is no positive entry.
    """
    scores = scores.flatten().double()
    positive = positive.flatten().bool()
    n = scores.numel()
    if n == 0 or not bool(positive.any()):
        return torch.tensor(float("nan"), dtype=torch.float64)
    ascending = torch.sort(scores).values
    below_or_equal = torch.searchsorted(ascending, scores, right=True)
    below = torch.searchsorted(ascending, scores, right=False)
    above = n - below_or_equal
    rank = above.double() + (below_or_equal - below - 1).double() / 2  # ties: their middle
    return rank[positive].mean() / n


class NormalisedMeanRank(Metric):
    """:func:`normalised_mean_rank` over every batch of an epoch (and every process)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("positive", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, positive: torch.Tensor) -> None:
        self.scores.append(scores.detach().flatten().double())
        self.positive.append(positive.detach().flatten().bool())

    def compute(self) -> torch.Tensor:
        if not self.scores:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return normalised_mean_rank(dim_zero_cat(self.scores), dim_zero_cat(self.positive))
