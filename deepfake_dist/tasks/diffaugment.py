"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of the discriminator's inputs.

With few real images (the 100 bundled faces) a discriminator memorises them and the generator's
training collapses. Augmenting real and fake images alike, with operations gradients pass through,
lets D see more variety without G learning the augmentation (G is trained through the same
augmentation, so what it matches is the un-augmented distribution). Each operation draws its
parameters per sample from the step's random generator, so a resumed run augments as the
uninterrupted one did. Grey images stay grey (colour acts on the channels they have).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(x: Tensor, rng: torch.Generator) -> Tensor:
    """(N, 1, 1, 1) draws from U(0, 1), one per sample, on ``x``'s device and dtype."""
    return torch.rand((x.shape[0], 1, 1, 1), generator=rng, device=rng.device).to(x.device, x.dtype)


def color(x: Tensor, rng: torch.Generator) -> Tensor:
    """Brightness shift in [-0.5, 0.5], saturation scale in [0, 2], contrast scale in [0.5, 1.5]."""
    x = x + (_uniform(x, rng) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (_uniform(x, rng) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, rng) + 0.5) + mean


def translation(x: Tensor, rng: torch.Generator, ratio: float = 0.125) -> Tensor:
    """Shift by up to ``ratio`` of the size, whole pixels each way, zeros coming in."""
    n, _, h, w = x.shape
    limit = torch.tensor([w, h], device=rng.device) * ratio // 1
    shift = (torch.rand((n, 2), generator=rng, device=rng.device) * (2 * limit + 1)).floor() - limit
    theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (2 * shift / torch.tensor([w, h], device=rng.device)).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: Tensor, rng: torch.Generator, ratio: float = 0.5) -> Tensor:
    """Zero a square of ``ratio`` of the size at a random place (partly off the image at the edges)."""
    n, _, h, w = x.shape
    extent = torch.tensor([h, w], device=rng.device)
    size = extent * ratio // 1
    centre = (torch.rand((n, 2), generator=rng, device=rng.device) * (extent + 1 - size % 2)).floor()
    start = (centre - size // 2).to(x.device)
    size = size.to(x.device)
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + size[0])
    inside_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + size[1])
    hole = inside_rows[:, :, None] & inside_cols[:, None, :]
    return x * (~hole)[:, None].to(x.dtype)


AUGMENTS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: Tensor, policies: Sequence[str], rng: torch.Generator) -> Tensor:
    """``x`` through each of ``policies`` in the order given (DiffAugment's: color, translation, cutout)."""
    for name in policies:
        x = AUGMENTS[name](x, rng)
    return x
