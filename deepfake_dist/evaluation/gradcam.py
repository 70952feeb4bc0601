"""Grad-CAM heat maps (captum's ``LayerGradCam``) and overlays, for every detector.

The target layer is the detector's ``gradcam_layer`` (a dotted module path, see
``models.detector.Detector``) unless the caller names another. Each map explains the verdict
the model gives that image: the fake logit for images it calls fake, the negated logit (the
real class) for the others, so a real face's map shows what made it look real.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image

from deepfake_dist.errors import UserError
from deepfake_dist.registry import closest


def find_layer(model: torch.nn.Module, layer: str | None = None) -> tuple[str, torch.nn.Module]:
    """``(name, module)`` of ``layer`` or, when None, of the model's ``gradcam_layer``."""
    name = layer or getattr(model, "gradcam_layer", None)
    if not name:
        raise UserError(f"{type(model).__name__} has no gradcam_layer; pass --layer NAME (a module path)")
    try:
        return name, attrgetter(name)(model)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise UserError(f"--layer {name!r} is not a module of this model{closest(name, names)}; "
                        f"e.g. {', '.join(names[:3])}, ... {names[-1]}") from None


def _signed_logit(*args) -> torch.Tensor:
    *inputs, sign, model, head = args
    logits = model(*inputs)
    return (logits if head is None else logits[:, head]) * sign


def attribute(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], module: torch.nn.Module,
              head: int | None = None) -> torch.Tensor:
    """captum's raw Grad-CAM maps of ``module``'s output (its positive part) for the verdict of
    logit ``head`` (a model with several heads; None: its only one), ``inputs`` being the model's
    arguments."""
    model.eval()
    with torch.no_grad():
        logits = model(*inputs)
        sign = torch.where((logits if head is None else logits[:, head]) > 0, 1.0, -1.0)
    cam = LayerGradCam(_signed_logit, module)
    with torch.enable_grad():
        maps = cam.attribute(tuple(x.detach().clone() for x in inputs), additional_forward_args=(sign, model, head),
                             relu_attributions=True)
    return maps.detach()


def scaled(maps: torch.Tensor, size: tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """Raw maps (N, 1, h, w) at ``size``, reshaped to ``(*shape, *size)``, each scaled by its own
    maximum into [0, 1] (a map with no positive evidence is all zeros)."""
    maps = LayerAttribution.interpolate(maps, tuple(size), interpolate_mode="bilinear")
    maps = maps.reshape(*shape, *size).clamp(min=0)
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, maps / peak.clamp(min=1e-12), torch.zeros_like(maps)).clamp(0, 1)


def gradcam(model: torch.nn.Module, images: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Heat maps (B, H, W) in [0, 1] at the input's size, each scaled by its own maximum.
    ``images``: normalized model inputs (B, C, H, W), or clips (B, T, C, H, W) for the temporal
    model, which gives (B, T, H, W), one map per frame. (Models that also take a clip's sound:
    ``evaluation.sound``.)"""
    _, module = find_layer(model, layer)
    return scaled(attribute(model, (images,), module), images.shape[-2:], images.shape[:-3])


def _as_rgb_array(image) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image, or a uint8 / [0, 1] float array or tensor, (C, H, W) or (H, W[, C])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def overlay(image, heat, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """The image (uint8 or [0, 1] float; CHW, HWC or grey) with the heat map ``heat`` (H, W) in
    [0, 1] blended on top in a colour map; the heat map is resized to the image if needed."""
    rgb = _as_rgb_array(image)
    heat = heat.detach().cpu().float().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    if heat.shape != rgb.shape[:2]:
        resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(rgb.shape[1::-1], Image.Resampling.BILINEAR)
        heat = np.asarray(resized)
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colour
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
