"""Magnitude pruning with ``torch.nn.utils.prune``, made permanent.

Unstructured: the ``amount`` smallest-|w| weights (L1) of every Conv2d and Linear are zeroed.
Structured: the ``amount`` output channels of every Conv2d with the smallest L_n norm are zeroed
whole (what a channel-pruning runtime can drop). The masks are folded into the weights
(``prune.remove``), so the result is a plain module that saves and loads like any other.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from deepfake_dist.errors import UserError


def prunable(model: nn.Module, structured: bool) -> list[tuple[str, nn.Module]]:
    """The layers pruning touches: convolutions (and, unstructured, linear layers too; a linear
    head's outputs are the logits, so structured pruning leaves it alone)."""
    kinds = (nn.Conv2d,) if structured else (nn.Conv2d, nn.Linear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def prune_model(model: nn.Module, amount: float, structured: bool = False, n: int = 2) -> nn.Module:
    """Zero ``amount`` (0..1) of each prunable layer's weights in place and make it permanent."""
    if not 0.0 <= amount < 1.0:
        raise UserError(f"--prune {amount}: the fraction to remove must be in [0, 1), e.g. 0.3")
    layers = prunable(model, structured)
    if not layers:
        raise UserError(f"{type(model).__name__} has no {'Conv2d' if structured else 'Conv2d/Linear'} layers to prune")
    for _, module in layers:
        if structured:
            prune.ln_structured(module, "weight", amount=amount, n=n, dim=0)
        else:
            prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")
    return model


def sparsity(model: nn.Module, structured: bool = False) -> float:
    """Fraction of zero weights over the layers ``prune_model`` prunes."""
    total = zeros = 0
    for _, module in prunable(model, structured):
        total += module.weight.numel()
        zeros += int((module.weight == 0).sum())
    return zeros / max(total, 1)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(p.count_nonzero()) for p in params)
