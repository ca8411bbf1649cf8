"""LoRA dropout without its activation memory: recompute the dropped input in the backward.

peft computes ``lora_B(lora_A(dropout(x)))`` for each adapted linear layer, so every one of
them keeps its own dropped copy of ``x`` (2 bytes per element in bf16) and a mask (1 byte)
for the backward: seven copies per Llama decoder layer, about half as much again as the rest
of the layer's activations (``bench/tuner_activation_memory.py``). Here ``dropout`` and
``lora_A`` run inside one non-reentrant checkpoint: only ``x`` (kept anyway, shared by
q/k/v and by gate/up) and the RNG state are saved, and the backward redraws the same mask.
The gradients are exactly those of peft's path; the price is the dropout and the rank-r
matmul once more (r / out_features of the layer's matmul, 1-3 % for r 128 on Llama).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _dropped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor:
    return F.linear(F.dropout(x, p, training), weight, bias)


class RecomputedDropoutLinear(nn.Linear):
    """``lora_A`` with its input dropout folded in and recomputed in the backward.

    Installed by swapping the class of peft's ``lora_A`` module (its parameters and
    state-dict keys stay as they are, so checkpoints, ``save_pretrained`` and merging are
    unchanged); ``input_dropout`` is the probability that peft's dropout module had."""

    input_dropout: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.input_dropout
        if not (self.training and p > 0.0 and torch.is_grad_enabled()):
            return F.linear(F.dropout(x, p, self.training), self.weight, self.bias)
        return checkpoint(
            _dropped_linear,
            x,
            self.weight,
            self.bias,
            p,
            True,
            use_reentrant=False,
            preserve_rng_state=True,
        )


def recompute_lora_dropout(model: nn.Module) -> int:
    """Fold each LoRA layer's input dropout into its ``lora_A`` (see the module docstring);
    returns how many layers changed. Layers without dropout (``p = 0``) are left alone."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for name, drop in list(dropouts.items()):
            target = dict(lora_a.items()).get(name)
            if not isinstance(drop, nn.Dropout) or drop.p == 0.0 or type(target) is not nn.Linear:
                continue
            target.__class__ = RecomputedDropoutLinear
            target.input_dropout = float(drop.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
