"""The recomputed adapter dropout redraws in the backward the very mask of the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from biomedvital.tuning.lora_memory import RecomputedDropoutLinear


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_uses_the_forward_mask(compiled: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False).double()
    layer.__class__ = RecomputedDropoutLinear
    layer.input_dropout = 0.5
    layer.train()
    run = torch.compile(layer) if compiled else layer
    x = torch.randn(64, 16, dtype=torch.double, requires_grad=True)
    g = torch.randn(64, 16, dtype=torch.double)
    y = run(x)
    (y * g).sum().backward()
    # the weight is square and invertible: the forward's dropped input is y W^-T
    dropped = y.detach() @ torch.linalg.inv(layer.weight.detach().T)
    kept = dropped.abs() > 1e-9
    assert 0.3 < kept.double().mean() < 0.7  # dropout was applied
    torch.testing.assert_close(dropped[kept], 2 * x.detach()[kept])  # scaled by 1 / (1 - p)
    torch.testing.assert_close(layer.weight.grad, g.T @ dropped)
    torch.testing.assert_close(x.grad, (g @ layer.weight.detach()) * kept * 2)


def test_eval_and_no_grad_apply_no_dropout() -> None:
    layer = nn.Linear(8, 8)
    layer.__class__ = RecomputedDropoutLinear
    layer.input_dropout = 0.9
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
