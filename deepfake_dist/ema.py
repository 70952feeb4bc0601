"""Exponential moving average of a model's weights (``torch.optim.swa_utils.AveragedModel``).

GAN samples, FID, synthesis and export use the averaged generator: it is smoother than the
raw one. The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a
short run is not dominated by the random initial weights. Buffers (BatchNorm statistics) are
averaged too. Under ZeRO-3 the trained model's parameters are partitioned; they are gathered
for each update (every rank takes part).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _ramped(decay: float):
    def average(ema_params, params, num_averaged):
        n = int(num_averaged)
        params = [p.to(e.dtype) for e, p in zip(ema_params, params)]  # a bf16 DeepSpeed engine into the fp32 copy
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(ema_params, params, num_averaged)

    return average


def _gathered(module: nn.Module):
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


class EMA:
    """``EMA(module, decay)`` copies ``module`` (before it is prepared, so the copy is whole);
    ``update(module)`` after each optimizer step; ``module`` is the averaged copy, in eval mode."""

    PREFIX = "ema."

    def __init__(self, module: nn.Module, decay: float):
        self.averaged = AveragedModel(module, multi_avg_fn=_ramped(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with _gathered(module):
            self.averaged.update_parameters(module)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + k: v for k, v in self.averaged.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = {k[len(self.PREFIX):]: v for k, v in tensors.items() if k.startswith(self.PREFIX)}
        if mine:
            self.averaged.load_state_dict(mine)
