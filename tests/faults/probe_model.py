"""``nonfinite_probe``: a small detector (the ``cnn``) whose forward pass goes wrong on chosen
training batches, for the non-finite loss tests. Importing this module registers it, so a test
(or a launched rank, see ``probe_launch.py``) can name it in a config:
``model.name=nonfinite_probe model.nan_at=[3] model.rank=1``."""

from __future__ import annotations

import os

import torch
from torch import nn

from deepfake_dist.models import MODELS
from deepfake_dist.models.cnn import cnn


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Probe(nn.Module):
    def __init__(self, inner: nn.Module, nan_at: list[int], inf_grad_at: list[int], rank: int,
                 nan_input_at: list[int] = ()):
        super().__init__()
        self.inner, self.nan_at, self.inf_grad_at = inner, set(nan_at), set(inf_grad_at)
        self.nan_input_at = set(nan_input_at)
        self.active = rank in (-1, int(os.environ.get("RANK", "0")))
        self.calls = 0  # training forwards so far, 1-based when checked

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.active and self.calls in self.nan_input_at:
                x = x * float("nan")
        logits = self.inner(x)
        if not self.training:
            return logits
        if self.active and self.calls in self.nan_at:
            return logits * float("nan")
        if self.active and self.calls in self.inf_grad_at:
            return _InfGrad.apply(logits)
        return logits


@MODELS.register("nonfinite_probe", kind="detector")
def nonfinite_probe(in_channels: int = 3, width: int = 8, nan_at: list[int] = (), inf_grad_at: list[int] = (),
                    rank: int = -1, nan_input_at: list[int] = ()) -> Probe:
    """NaN logits on the training forwards numbered in ``nan_at``, an infinite gradient on those in
    ``inf_grad_at``, a NaN input on those in ``nan_input_at`` (BatchNorm's running statistics take
    it in, so every later evaluation scores NaN); only on rank ``rank`` (-1: every rank)."""
    return Probe(cnn(in_channels=in_channels, width=width), list(nan_at), list(inf_grad_at), rank, list(nan_input_at))
