"""The perturbations images meet in the wild, applied to the decoded uint8 test image before the
usual eval transform (resize, scale, normalize): JPEG recompression, Gaussian blur, downscaling.
Each one is deterministic, so every rank and every run sees the same perturbed image."""

from __future__ import annotations

import math

from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def _downscale_half(image):
    """Half the width and height (antialiased); the eval transform then resizes back up."""
    h, w = image.shape[-2:]
    return TF.resize(image, [max(h // 2, 1), max(w // 2, 1)], antialias=True)


def _blur(sigma: float) -> v2.GaussianBlur:
    return v2.GaussianBlur(2 * math.ceil(3 * sigma) + 1, sigma=(sigma, sigma))


# name -> picklable transform of a uint8 (C, H, W) tensor (DataLoader workers may be spawned)
PERTURBATIONS = {
    "jpeg q90": v2.JPEG(quality=90),
    "jpeg q75": v2.JPEG(quality=75),
    "jpeg q50": v2.JPEG(quality=50),
    "blur sigma 1": _blur(1.0),
    "blur sigma 2": _blur(2.0),
    "downscale x0.5": _downscale_half,
}
