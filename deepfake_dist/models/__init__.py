"""The model registry: every architecture registers itself by name where it is defined.

``create_model(name, **kwargs)`` builds any of them. Each entry carries ``kind`` metadata:
``detector`` (image or clip -> one logit per sample, fake = positive), ``gan``, ``autoencoder`` or
``diffusion``; an entry whose training differs from its kind's names its ``task`` (e.g. StyleGAN2),
and a detector that takes a clip's sound or gives several logits says so (``model_io``).
"""

from __future__ import annotations

import importlib
import pkgutil

from deepfake_dist.registry import Registry

MODELS = Registry("model")


def create_model(name: str, **kwargs):
    return MODELS.get(name)(**kwargs)


def model_kind(name: str) -> str:
    return MODELS.meta(name)["kind"]


def model_io(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A detector's (inputs, heads): the batch members it takes, in order (``image``, ``audio``),
    and what each of its logits predicts (``overall``, ``video``, ``audio``: the labels of the
    clip, its frames, its sound). Declared where it registers; by default one image, one logit."""
    meta = MODELS.meta(name)
    return tuple(meta.get("inputs", ("image",))), tuple(meta.get("heads", ("overall",)))


# Import every module of this package so each architecture registers itself (no hand-kept list).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
