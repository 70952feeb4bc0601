"""Decode and augment images from shards (torchvision on uint8 tensors).

The augmentations are the usual flip / random resized crop / jitter plus the JPEG
recompression and Gaussian blur of Wang et al. 2020 ("CNN-generated images are surprisingly
easy to spot... for now"), each applied with its own probability.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from deepfake_dist.config import AugmentConfig

MEANS = {"imagenet": (0.485, 0.456, 0.406), "half": (0.5, 0.5, 0.5)}
STDS = {"imagenet": (0.229, 0.224, 0.225), "half": (0.5, 0.5, 0.5)}


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 tensor (channels, H, W); grey sources become 3 identical planes."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def plane_stats(channels: int, kind: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kind`` mean and std as (C, 1, 1) tensors; one grey plane gets the mean of the
    per-channel statistics."""
    mean, std = MEANS[kind], STDS[kind]
    if channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1)


class Normalize:
    """uint8 images (..., C, H, W) -> float32 scaled to [0, 1] and normalised per plane, on the
    images' device. The loaders hand over uint8 and apply this to whole batches, after the move
    to the device (as timm's PrefetchLoader): a quarter of float32's shared memory and
    host-to-device traffic, and no per-sample work (BENCHMARKS.md, loader)."""

    def __init__(self, channels: int, kind: str):
        mean, std = plane_stats(channels, kind)
        self.scale, self.shift = 1 / (255 * std), -mean / std  # (x / 255 - mean) / std in two operations
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalize expects uint8 images, got {images.dtype}")
        if images.device not in self.on_device:
            self.on_device[images.device] = self.scale.to(images.device), self.shift.to(images.device)
        scale, shift = self.on_device[images.device]
        return images.float().mul_(scale).add_(shift)


def eval_resize(resolution: int, perturb=None) -> v2.Compose:
    """What evaluation does to a decoded uint8 image before ``Normalize``: ``perturb`` (a
    robustness test: JPEG, blur, downscale) first, then the resize to the model's resolution."""
    return v2.Compose([*([perturb] if perturb is not None else []), v2.Resize((resolution, resolution), antialias=True)])


def eval_transform(resolution: int, channels: int, norm: str, perturb=None) -> v2.Compose:
    """One decoded uint8 image -> the model's float input (single-image inference)."""
    return v2.Compose([eval_resize(resolution, perturb), Normalize(channels, norm)])


class TrainAugment:
    """Resize, then flip / random resized crop / brightness + contrast jitter / JPEG / blur, each
    with its probability, uint8 in and out (``Normalize`` follows, per batch). The random draws
    come from torch's default CPU generator (the loader seeds it per sample) and the work from
    torchvision's functional kernels: at 64 px, composing ``v2`` transform objects cost as much
    as the image work itself (BENCHMARKS.md, loader). A clip (T, C, H, W) gets one draw for all
    its frames."""

    def __init__(self, resolution: int, aug: AugmentConfig):
        self.size, self.aug = resolution, aug

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        aug, size = self.aug, self.size
        u = torch.rand(13).tolist()  # one draw of every parameter, used or not: a fixed stream per sample
        if image.shape[-2:] != (size, size):
            image = TF.resize(image, [size, size], antialias=True)
        if u[0] < aug.hflip:
            image = image.flip(-1)
        if u[1] < aug.crop:  # as v2.RandomResizedCrop: area fraction and log aspect ratio uniform
            area = size * size * (aug.crop_scale[0] + u[2] * (aug.crop_scale[1] - aug.crop_scale[0]))
            ratio = math.exp(math.log(3 / 4) + u[3] * math.log(16 / 9))
            w, h = min(size, round(math.sqrt(area * ratio))), min(size, round(math.sqrt(area / ratio)))
            top, left = int(u[4] * (size - h + 1)), int(u[5] * (size - w + 1))
            image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if u[6] < aug.jitter:
            s = aug.jitter_strength
            image = TF.adjust_contrast(TF.adjust_brightness(image, 1 - s + 2 * s * u[7]), 1 - s + 2 * s * u[8])
        if u[9] < aug.jpeg:
            low, high = aug.jpeg_quality
            image = TF.jpeg(image, min(high, low + int(u[10] * (high - low + 1))))
        if u[11] < aug.blur:
            image = gaussian_blur(image, aug.blur_sigma[0] + u[12] * (aug.blur_sigma[1] - aug.blur_sigma[0]))
        return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 (..., H, W) blurred by two 1-D convolutions with a kernel of 3 sigma each side, far
    cheaper than the square kernel of the largest sigma that ``v2.GaussianBlur`` uses
    (BENCHMARKS.md, loader)."""
    height, width = image.shape[-2:]
    radius = max(1, min(math.ceil(3 * sigma), height - 1, width - 1))  # reflect padding needs less than a side
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    planes = image.reshape(-1, 1, height, width).float()
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return planes.round_().clamp_(0, 255).to(torch.uint8).reshape(image.shape)


def denormalize(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Back to [0, 1] for pictures (the inverse of ``Normalize``)."""
    mean, std = plane_stats(x.shape[-3], norm, x.device)
    return (x * std + mean).clamp(0, 1)
