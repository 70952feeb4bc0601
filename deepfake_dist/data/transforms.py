"""Decode and augment images from shards (torchvision v2 on uint8 tensors).

The augmentations are the usual flip / random resized crop / jitter plus the JPEG
recompression and Gaussian blur of Wang et al. 2020 ("CNN-generated images are surprisingly
easy to spot... for now"), each applied with its own probability.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from deepfake_dist.config import AugmentConfig

MEANS = {"imagenet": (0.485, 0.456, 0.406), "half": (0.5, 0.5, 0.5)}
STDS = {"imagenet": (0.229, 0.224, 0.225), "half": (0.5, 0.5, 0.5)}


def decode(data: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 tensor (channels, H, W); grey sources become 3 identical planes."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def normalize(channels: int, kind: str) -> v2.Normalize:
    mean, std = MEANS[kind], STDS[kind]
    if channels == 1:  # one grey plane: the mean of the per-channel statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return v2.Normalize(mean, std)


def eval_transform(resolution: int, channels: int, norm: str, perturb=None) -> v2.Compose:
    """``perturb`` (a robustness test: JPEG, blur, downscale) acts on the decoded uint8 image first."""
    return v2.Compose(
        [
            *([perturb] if perturb is not None else []),
            v2.Resize((resolution, resolution), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            normalize(channels, norm),
        ]
    )


def train_transform(resolution: int, channels: int, norm: str, aug: AugmentConfig) -> v2.Compose:
    jitter = aug.jitter_strength
    kernel = 2 * int(round(3 * aug.blur_sigma[1])) + 1
    return v2.Compose(
        [
            v2.Resize((resolution, resolution), antialias=True),
            v2.RandomHorizontalFlip(aug.hflip),
            v2.RandomApply([v2.RandomResizedCrop(resolution, scale=aug.crop_scale, antialias=True)], p=aug.crop),
            v2.RandomApply([v2.ColorJitter(brightness=jitter, contrast=jitter)], p=aug.jitter),
            v2.RandomApply([v2.JPEG(quality=aug.jpeg_quality)], p=aug.jpeg),
            v2.RandomApply([v2.GaussianBlur(min(kernel, resolution | 1), sigma=aug.blur_sigma)], p=aug.blur),
            v2.ToDtype(torch.float32, scale=True),
            normalize(channels, norm),
        ]
    )


def denormalize(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Back to [0, 1] for pictures (inverse of ``normalize``)."""
    channels = x.shape[-3]
    n = normalize(channels, norm)
    mean = torch.tensor(n.mean, device=x.device).view(-1, 1, 1)
    std = torch.tensor(n.std, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)
