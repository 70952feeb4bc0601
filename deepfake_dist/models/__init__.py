"""The model registry: every architecture registers itself by name where it is defined.

``create_model(name, **kwargs)`` builds any of them. Each entry carries ``kind`` metadata:
``detector`` (image or clip -> one logit per sample, fake = positive), ``gan`` or ``autoencoder``.
"""

from __future__ import annotations

from deepfake_dist.registry import Registry

MODELS = Registry("model")


def create_model(name: str, **kwargs):
    return MODELS.get(name)(**kwargs)


def model_kind(name: str) -> str:
    return MODELS.meta(name)["kind"]
