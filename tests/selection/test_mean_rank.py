"""The released selector's normalised mean rank: hand-worked golden values."""

from __future__ import annotations

import math

import torch

from biomedvital.selection.metrics import NormalisedMeanRank, normalised_mean_rank


def test_golden_values() -> None:
    # best first: 0.9 (preferred, rank 0), 0.6 (rank 1), 0.4 (preferred, rank 2), 0.1 (rank 3)
    scores = torch.tensor([0.9, 0.4, 0.6, 0.1])
    positive = torch.tensor([1, 1, 0, 0])
    assert normalised_mean_rank(scores, positive).item() == (0 + 2) / 2 / 4
    # a perfect ordering of n pairs gives (n - 1) / 4n; the reverse one (3n - 1) / 4n
    n = 5
    good = torch.cat([torch.arange(10.0, 15.0), torch.arange(0.0, 5.0)])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    assert math.isclose(normalised_mean_rank(good, labels).item(), (n - 1) / (4 * n))
    assert math.isclose(normalised_mean_rank(-good, labels).item(), (3 * n - 1) / (4 * n))


def test_ties_take_the_middle_of_their_ranks() -> None:
    # all four tied: ranks 0..3 all become 1.5, so 1.5 / 4 whatever the sort's order
    same = torch.zeros(4)
    assert normalised_mean_rank(same, torch.tensor([1, 0, 1, 0])).item() == 1.5 / 4
    # a preferred answer tied with a rejected one at the top: ranks 0 and 1 share 0.5
    scores = torch.tensor([2.0, 2.0, 1.0, 0.0])
    assert normalised_mean_rank(scores, torch.tensor([1, 0, 1, 0])).item() == (0.5 + 2) / 2 / 4


def test_metric_accumulates_batches_and_has_no_value_without_positives() -> None:
    m = NormalisedMeanRank()
    assert math.isnan(m.compute().item())
    m.update(torch.tensor([0.9, 0.6]), torch.tensor([1, 0]))
    m.update(torch.tensor([0.4, 0.1]), torch.tensor([1, 0]))
    assert m.compute().item() == (0 + 2) / 2 / 4  # as if one batch: ranks are global
    assert math.isnan(normalised_mean_rank(torch.ones(3), torch.zeros(3)).item())
