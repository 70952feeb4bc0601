"""StyleGAN2 (Karras et al. 2020): a style-based generator and a residual discriminator.

Written after the paper and the design of NVlabs' stylegan2-ada-pytorch, in plain PyTorch (no
custom CUDA ops):

- mapping network: z (normalised) -> w through ``mapping_layers`` fully connected layers with a
  learning-rate multiplier of 0.01; the running average of w (``w_avg``) is tracked while training
  and is what truncation pulls towards (``truncation`` psi: w = w_avg + psi (w - w_avg)).
- synthesis network ("skip" generator): a learned 4x4 constant, then per resolution two modulated
  and demodulated 3x3 convolutions (the first after a bilinear 2x upsampling) with per-pixel noise
  inputs, and a toRGB layer whose outputs are upsampled and summed into the image.
- discriminator ("resnet"): fromRGB, residual blocks that halve the resolution (a [1, 3, 3, 1]
  low-pass before every subsampling), minibatch standard deviation, a 3x3 conv and two dense layers.

Every layer uses the equalized learning rate (weights drawn N(0, 1), scaled by 1/sqrt(fan_in) at
run time) and leaky ReLU with gain sqrt(2). Under bf16 the convolutions run in bf16 and the parts
whose precision matters run in fp32: the mapping network and ``w_avg``, the demodulation
coefficients, and the sum of the toRGB outputs (the image).

Noise inputs: ``noise=None`` uses each layer's fixed noise map (``noise_const``), so a latent
always gives the same image (grids, FID, synthesis); training passes a ``torch.Generator`` and
each layer draws fresh noise from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.convstacks import gaussian

GAIN = math.sqrt(2)  # leaky ReLU's gain: keeps activations at unit variance
RESOLUTIONS = tuple(2 ** i for i in range(3, 11))  # 8 .. 1024


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2) * GAIN


def fp32(x: Tensor):
    """A region that computes in fp32 even under autocast."""
    return torch.autocast(x.device.type, enabled=False)


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(1, keepdim=True) + eps).rsqrt()


def blur_down(x: Tensor) -> Tensor:
    """2x downsampling after the separable [1, 3, 3, 1] low-pass (StyleGAN2's resampling filter),
    as a depthwise strided convolution."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (taps[:, None] * taps[None, :] / 64).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, stride=2, groups=x.shape[1])


def upsample(x: Tensor) -> Tensor:
    """2x bilinear upsampling: the [1, 3, 3, 1] filter of StyleGAN2's upsampling, edges replicated."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def draw(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """N(0, 1) noise of ``shape`` from ``generator`` (on its device), then on ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


class EqualLinear(nn.Module):
    """A dense layer with the equalized learning rate; ``lr_mul`` slows it (the mapping network)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain, self.lr_mul, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight.to(x.dtype) * self.weight_gain, self.bias.to(x.dtype) * self.lr_mul)
        return lrelu(x) if self.activate else x


class EqualConv(nn.Module):
    """A convolution with the equalized learning rate (the discriminator's layers)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, activate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain, self.activate = 1 / math.sqrt(in_channels * kernel * kernel), activate

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        x = F.conv2d(x, self.weight.to(x.dtype) * self.weight_gain, bias, padding=self.weight.shape[-1] // 2)
        return lrelu(x) if self.activate else x


class MappingNetwork(nn.Module):
    """z -> w in fp32, tracking the average w while training (what truncation pulls towards)."""

    # DeepSpeed keeps buffers matching these names in fp32 when it casts the model to bf16/fp16:
    # a lerp by 1 - w_avg_beta would vanish in bf16's 8-bit mantissa
    _keep_in_fp32_modules_strict = ["w_avg"]

    def __init__(self, z_dim: int, w_dim: int, layers: int, w_avg_beta: float):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, lr_mul=0.01, activate=True) for a, b in zip(dims, dims[1:])])
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, truncation: float = 1.0, track: bool = True) -> Tensor:
        with fp32(z):
            w = self.net(normalize_2nd_moment(z.float()))
            if self.training and track:
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg.float(), self.w_avg_beta))
            if truncation != 1:
                w = self.w_avg.float().lerp(w, truncation)
        return w


class ModulatedConv(nn.Module):
    """A conv whose input channels are scaled per sample by a style (an affine map of w), then
    demodulated so each output channel has unit expected variance; noise, bias and activation follow
    (``to_rgb``: a 1x1 conv, neither demodulated nor activated, as StyleGAN2's toRGB)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False,
                 to_rgb: bool = False):
        super().__init__()
        kernel = 1 if to_rgb else 3
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.up, self.to_rgb = up, to_rgb
        if not to_rgb:
            self.noise_strength = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed cannot flatten a 0-d parameter
            self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x: Tensor, w: Tensor, noise: torch.Generator | None) -> Tensor:
        with fp32(x):
            styles = self.affine(w.float())
            weight = self.weight.float() * self.weight_gain
            if not self.to_rgb:  # demodulation: 1 / sqrt(sum over inputs and taps of (weight * style)^2)
                demod = (styles.square() @ weight.square().sum((2, 3)).t() + 1e-8).rsqrt()
        if self.up:
            x = upsample(x)
        x = x * styles.to(x.dtype)[:, :, None, None]
        x = F.conv2d(x, weight.to(x.dtype), padding=weight.shape[-1] // 2)
        if self.to_rgb:
            return x + self.bias.to(x.dtype)[:, None, None]
        x = x * demod.to(x.dtype)[:, :, None, None]
        size = x.shape[-2:]
        maps = self.noise_const if noise is None else draw((x.shape[0], 1, *size), noise, x)
        x = x + maps.to(x.dtype) * self.noise_strength.to(x.dtype)
        return lrelu(x + self.bias.to(x.dtype)[:, None, None])


def widths(resolution: int, channel_base: int, channel_max: int) -> dict[int, int]:
    """Channels per resolution, 4 .. ``resolution``: fewer at higher resolutions (as StyleGAN2)."""
    return {r: min(channel_base // r, channel_max) for r in [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]}


class SynthesisNetwork(nn.Module):
    """ws (B, num_ws, w_dim) -> image: the skip architecture. Conv layer i takes ws[:, i]; the toRGB
    after a resolution's convs takes the next index (the official layout: num_ws = convs + 1)."""

    def __init__(self, w_dim: int, resolution: int, channels: int, chans: dict[int, int]):
        super().__init__()
        self.const = nn.Parameter(torch.randn(chans[4], 4, 4))
        self.convs, self.to_rgbs, self.convs_per_resolution = nn.ModuleList(), nn.ModuleList(), []
        for res, ch in chans.items():
            if res > 4:
                self.convs.append(ModulatedConv(chans[res // 2], ch, w_dim, res, up=True))
            self.convs.append(ModulatedConv(ch, ch, w_dim, res))
            self.convs_per_resolution.append(1 if res == 4 else 2)
            self.to_rgbs.append(ModulatedConv(ch, channels, w_dim, res, to_rgb=True))
        self.num_ws = len(self.convs) + 1

    def forward(self, ws: Tensor, noise: torch.Generator | None) -> Tensor:
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        image, i = None, 0
        for to_rgb, count in zip(self.to_rgbs, self.convs_per_resolution):
            for conv in self.convs[i:i + count]:
                x = conv(x, ws[:, i], noise)
                i += 1
            rgb = to_rgb(x, ws[:, i], noise).float()
            image = rgb if image is None else upsample(image) + rgb
        return image


class Generator(nn.Module):
    """``forward(z (B, z_dim), labels=None)`` -> images (B, channels, res, res), about [-1, 1]
    (unbounded: synthesis clamps). ``truncation`` psi pulls w towards ``w_avg``; ``noise`` (a
    ``torch.Generator``) draws fresh noise inputs, None uses the fixed ones; ``mixing``: the
    probability that from a random layer on the styles come from a second latent (style mixing
    regularisation, drawn on ``noise``); ``return_ws`` also returns the broadcast w (for the
    path-length penalty). Unconditional: ``labels`` is accepted and ignored, as in the GAN task."""

    num_classes = 0

    def __init__(self, resolution: int, channels: int, z_dim: int, w_dim: int, mapping_layers: int,
                 chans: dict[int, int], w_avg_beta: float):
        super().__init__()
        self.z_dim = z_dim
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, w_avg_beta)
        self.synthesis = SynthesisNetwork(w_dim, resolution, channels, chans)
        self.num_ws = self.synthesis.num_ws

    def forward(self, z: Tensor, labels: Tensor | None = None, truncation: float = 1.0,
                noise: torch.Generator | None = None, mixing: float = 0.0, return_ws: bool = False):
        ws = self.mapping(z, truncation)[:, None].repeat(1, self.num_ws, 1)
        if mixing and noise is not None:  # drawn on the device: no step waits for it
            other = self.mapping(draw(tuple(z.shape), noise, z), truncation, track=False)
            cutoff = torch.randint(1, self.num_ws, (), generator=noise, device=noise.device)
            mixed = torch.rand((), generator=noise, device=noise.device) < mixing
            layers = torch.arange(self.num_ws, device=noise.device)
            keep = (layers < torch.where(mixed, cutoff, self.num_ws)).to(ws.device)
            ws = torch.where(keep[None, :, None], ws, other[:, None])
        image = self.synthesis(ws, noise)
        return (image, ws) if return_ws else image

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, z_dim) N(0, 1) latents on this generator's device."""
        return gaussian(n, self.z_dim, next(self.parameters()).device, generator)


def minibatch_std(x: Tensor, group_size: int) -> Tensor:
    """One more channel: the standard deviation of each feature over a group of samples, averaged
    (lets the discriminator see a batch's variety). The group is the largest divisor of the batch
    up to ``group_size``, so any batch size works."""
    n, c, h, w = x.shape
    group = math.gcd(n, group_size)
    y = x.float().reshape(group, -1, c, h, w)
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (n / group,)
    y = y.repeat(group)[:, None, None, None].expand(n, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], 1)


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs (the second at half resolution) beside a 1x1 skip, summed with gain sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv(in_channels, in_channels, 3)
        self.conv1 = EqualConv(in_channels, out_channels, 3)
        self.skip = EqualConv(in_channels, out_channels, 1, bias=False, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.skip(blur_down(x))
        x = self.conv1(blur_down(self.conv0(x)))
        return (x + skip) * math.sqrt(0.5)


class Discriminator(nn.Module):
    """``forward(x, labels=None)`` -> (B,) logits, real = positive; ``labels`` is ignored."""

    def __init__(self, channels: int, chans: dict[int, int], mbstd_group: int):
        super().__init__()
        resolutions = sorted(chans, reverse=True)
        self.from_rgb = EqualConv(channels, chans[resolutions[0]], 1)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(chans[r], chans[r // 2]) for r in resolutions[:-1]])
        ch = chans[4]
        self.mbstd_group = mbstd_group
        self.conv = EqualConv(ch + 1, ch, 3)
        self.fc = EqualLinear(ch * 16, ch, activate=True)
        self.out = EqualLinear(ch, 1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        x = self.blocks(self.from_rgb(x))
        x = self.conv(minibatch_std(x, self.mbstd_group))
        return self.out(self.fc(x.flatten(1))).flatten()


class StyleGAN2(nn.Module):
    """The generator and its discriminator, with the facts the GAN task and synthesis need."""

    num_classes = 0

    def __init__(self, resolution: int, channels: int, z_dim: int, w_dim: int, mapping_layers: int,
                 channel_base: int, channel_max: int, mbstd_group: int, w_avg_beta: float):
        super().__init__()
        chans = widths(resolution, channel_base, channel_max)
        self.generator = Generator(resolution, channels, z_dim, w_dim, mapping_layers, chans, w_avg_beta)
        self.discriminator = Discriminator(channels, chans, mbstd_group)
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels


@MODELS.register("stylegan2", kind="gan", task="stylegan2")
def stylegan2(
    resolution: int = 64,
    channels: int = 3,
    z_dim: int = 512,
    w_dim: int = 512,
    mapping_layers: int = 8,
    channel_base: int = 16384,
    channel_max: int = 512,
    mbstd_group: int = 4,
    w_avg_beta: float = 0.995,
) -> StyleGAN2:
    if resolution not in RESOLUTIONS:
        raise UserError(f"stylegan2 resolution {resolution} is not supported; choose a power of two from 8 to 1024")
    for name, value in (("z_dim", z_dim), ("w_dim", w_dim), ("mapping_layers", mapping_layers),
                        ("mbstd_group", mbstd_group)):
        if value < 1:
            raise UserError(f"stylegan2 {name} must be at least 1, got {value}")
    if min(widths(resolution, channel_base, channel_max).values()) < 1:
        raise UserError(f"stylegan2 channel_base {channel_base} leaves no channels at {resolution} px; "
                        f"set it to at least {resolution}")
    if not 0.0 <= w_avg_beta < 1.0:
        raise UserError(f"stylegan2 w_avg_beta must be in [0, 1), got {w_avg_beta}")
    return StyleGAN2(resolution, channels, z_dim, w_dim, mapping_layers, channel_base, channel_max, mbstd_group,
                     w_avg_beta)
