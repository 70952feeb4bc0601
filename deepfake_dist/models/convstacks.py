"""DCGAN conv stacks between a vector and an image, shared by the GANs and the autoencoders.

``up_stack`` is the DCGAN generator (vector -> image in [-1, 1]) and ``down_stack`` the DCGAN
discriminator body (image -> vector); both use DCGAN's N(0, 0.02) initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm

from deepfake_dist.errors import UserError

RESOLUTIONS = (32, 64, 128)


def stages(resolution: int) -> int:
    """Number of x2 steps between the 4x4 core and the image."""
    if resolution not in RESOLUTIONS:
        raise UserError(f"resolution {resolution} is not supported; choose one of {', '.join(map(str, RESOLUTIONS))}")
    return int(math.log2(resolution)) - 2


def dcgan_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def up_stack(in_dim: int, resolution: int, channels: int, width: int) -> nn.Sequential:
    """(B, in_dim, 1, 1) -> (B, channels, res, res) in [-1, 1]. At 64 px this is the DCGAN
    generator: 4x4 with width*8 channels, halving channels while doubling size, then Tanh."""
    n = stages(resolution)
    ch = width * 2 ** (n - 1)
    layers = [nn.ConvTranspose2d(in_dim, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
    for _ in range(n - 1):
        layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
        ch //= 2
    layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
    stack = nn.Sequential(*layers)
    stack.apply(dcgan_init)
    return stack


def down_stack(
    in_channels: int, resolution: int, width: int, out_dim: int, spectral_norm: bool = False
) -> nn.Sequential:
    """(B, in_channels, res, res) -> (B, out_dim, 1, 1). At 64 px this is the DCGAN
    discriminator: stride-2 4x4 convs with LeakyReLU(0.2) and BatchNorm (not on the first),
    down to 4x4 with width*8 channels, then a 4x4 conv. With ``spectral_norm`` every conv is
    spectrally normalised and BatchNorm is left out."""
    layers, ch = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)], width
    for _ in range(stages(resolution) - 1):
        norm = [] if spectral_norm else [nn.BatchNorm2d(2 * ch)]
        layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=spectral_norm), *norm, nn.LeakyReLU(0.2, True)]
        ch *= 2
    layers.append(nn.Conv2d(ch, out_dim, 4, 1, 0))
    stack = nn.Sequential(*layers)
    stack.apply(dcgan_init)
    if spectral_norm:
        for layer in stack:
            if isinstance(layer, nn.Conv2d):
                with_spectral_norm(layer)
    return stack


def gaussian(n: int, dim: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """(n, dim) N(0, 1) draws on ``device``, drawn on ``generator``'s device so a seeded
    generator gives the same draws whatever device the model is on."""
    where = generator.device if generator is not None else device
    return torch.randn(n, dim, generator=generator, device=where).to(device)
