"""``fault_probe``: a small detector (the ``cnn``) that goes wrong on chosen forward passes, for
the fault tests. Importing this module registers it, so a test (or a launched rank, see
``probe_launch.py``) can name it in a config: ``model.name=fault_probe model.nan_at=[3] model.rank=1``."""

from __future__ import annotations

import os
import signal

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
    def __init__(self, inner: nn.Module, rank: int, nan_at=(), inf_grad_at=(), nan_input_at=(), stop_at=(),
                 inf_eval_at=(), kill_eval_at=()):
        super().__init__()
        self.inner, self.nan_at, self.inf_grad_at = inner, set(nan_at), set(inf_grad_at)
        self.nan_input_at, self.stop_at = set(nan_input_at), set(stop_at)
        self.inf_eval_at, self.kill_eval_at = set(inf_eval_at), set(kill_eval_at)
        self.active = rank in (-1, int(os.environ.get("RANK", "0")))
        self.calls = 0  # training forwards so far, 1-based when checked
        self.eval_calls = 0  # evaluation forwards so far, the trainer's check of a blank sample at start included

    def forward(self, x):
        if not self.training:
            return self._evaluate(x)
        self.calls += 1
        if self.active and self.calls in self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption, noticed by the trainer at the end of the step
        if self.active and self.calls in self.nan_input_at:
            x = x * float("nan")
        logits = self.inner(x)
        if self.active and self.calls in self.nan_at:
            return logits * float("nan")
        if self.active and self.calls in self.inf_grad_at:
            return _InfGrad.apply(logits)
        return logits

    def _evaluate(self, x):
        self.eval_calls += 1
        if self.active and self.eval_calls in self.kill_eval_at:
            os.kill(os.getpid(), signal.SIGKILL)
        logits = self.inner(x)
        if self.active and self.eval_calls in self.inf_eval_at:
            return torch.full_like(logits, float("inf"))  # scores of 1.0, a loss of NaN
        return logits


@MODELS.register("fault_probe", kind="detector")
def fault_probe(in_channels: int = 3, width: int = 8, rank: int = -1, nan_at: list[int] = (),
                inf_grad_at: list[int] = (), nan_input_at: list[int] = (), stop_at: list[int] = (),
                inf_eval_at: list[int] = (), kill_eval_at: list[int] = ()) -> Probe:
    """On the training forwards numbered in ``nan_at``: NaN logits; ``inf_grad_at``: an infinite
    gradient; ``nan_input_at``: a NaN input (BatchNorm's running statistics take it in, so every
    later evaluation scores NaN); ``stop_at``: a SIGTERM to its own process. On the evaluation
    forwards numbered in ``inf_eval_at``: infinite logits; ``kill_eval_at``: a SIGKILL to its own
    process. Only on rank ``rank`` (-1: every rank)."""
    return Probe(cnn(in_channels=in_channels, width=width), rank, nan_at, inf_grad_at, nan_input_at, stop_at,
                 inf_eval_at, kill_eval_at)
