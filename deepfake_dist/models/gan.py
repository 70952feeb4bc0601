"""DCGAN and conditional DCGAN face generators at 32, 64 or 128 px.

A ``GAN`` holds ``generator`` and ``discriminator`` for the trainer to prepare and step apart.
The conditional variant feeds a label embedding to both: concatenated to z in G, and projected
to one extra input channel (a learned map per class) in D.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.convstacks import down_stack, gaussian, up_stack


def need_labels(labels: Tensor | None, num_classes: int) -> Tensor:
    if labels is None:
        raise ValueError(f"this conditional model needs labels (LongTensor (B,) in [0, {num_classes}))")
    return labels


class Generator(nn.Module):
    """``forward(z (B, z_dim), labels=None)`` -> images (B, channels, res, res) in [-1, 1];
    labels are required when ``num_classes`` > 0 and ignored otherwise."""

    def __init__(self, resolution: int, channels: int, z_dim: int, ngf: int, num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.net = up_stack(z_dim * (2 if num_classes else 1), resolution, channels, ngf)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        z = z.flatten(1)
        if self.embed is not None:
            z = torch.cat([z, self.embed(need_labels(labels, self.num_classes))], 1)
        return self.net(z[:, :, None, None])

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, z_dim) N(0, 1) noise on this generator's device."""
        return gaussian(n, self.z_dim, next(self.parameters()).device, generator)


class Discriminator(nn.Module):
    """``forward(x, labels=None)`` -> (B,) logits (real = positive under the usual BCE loss);
    labels are required when ``num_classes`` > 0 and ignored otherwise."""

    def __init__(self, resolution: int, channels: int, ndf: int, num_classes: int = 0, spectral_norm: bool = False):
        super().__init__()
        self.resolution, self.num_classes = resolution, num_classes
        self.embed = nn.Embedding(num_classes, resolution * resolution) if num_classes else None
        self.net = down_stack(channels + (1 if num_classes else 0), resolution, ndf, 1, spectral_norm)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            label_map = self.embed(need_labels(labels, self.num_classes))
            x = torch.cat([x, label_map.view(-1, 1, self.resolution, self.resolution)], 1)
        return self.net(x).flatten()


class GAN(nn.Module):
    """A generator and its discriminator, with the facts the trainer and synthesis need."""

    def __init__(
        self,
        resolution: int = 64,
        channels: int = 3,
        z_dim: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        spectral_norm: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        self.generator = Generator(resolution, channels, z_dim, ngf, num_classes)
        self.discriminator = Discriminator(resolution, channels, ndf, num_classes, spectral_norm)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.resolution, self.channels = resolution, channels


@MODELS.register("dcgan", kind="gan")
def dcgan(
    resolution: int = 64,
    channels: int = 3,
    z_dim: int = 100,
    ngf: int = 64,
    ndf: int = 64,
    spectral_norm: bool = False,
) -> GAN:
    return GAN(resolution, channels, z_dim, ngf, ndf, spectral_norm)


@MODELS.register("cdcgan", kind="gan")
def cdcgan(
    resolution: int = 64,
    channels: int = 3,
    z_dim: int = 100,
    ngf: int = 64,
    ndf: int = 64,
    spectral_norm: bool = False,
    num_classes: int = 2,
) -> GAN:
    if num_classes < 2:
        raise UserError(f"cdcgan num_classes must be at least 2, got {num_classes}")
    return GAN(resolution, channels, z_dim, ngf, ndf, spectral_norm, num_classes)
