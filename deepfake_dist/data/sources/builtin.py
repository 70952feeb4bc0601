"""``builtin:NAME``: face sets that ship inside an installed package, so the quickstart and the
tests need no download (``builtin:lfw``)."""

from __future__ import annotations

import functools

from PIL import Image

from deepfake_dist.data.common import LABELS, Item
from deepfake_dist.data.sources.base import Source, only_real
from deepfake_dist.errors import UserError
from deepfake_dist.registry import Registry

BUILTINS = Registry("builtin dataset")


def open_builtin(arg: str, label: str | None) -> Source:
    return BUILTINS.get(arg)(label)


@functools.lru_cache(maxsize=1)
def _lfw_faces():
    import numpy as np

    try:
        from skimage import data
    except ImportError:  # pragma: no cover - scikit-image is a runtime dependency
        raise UserError("builtin:lfw needs scikit-image: pip install scikit-image") from None
    faces = data.lfw_subset()[:100]  # first 100 are faces, the next 100 are not
    return (faces * 255.0).round().clip(0, 255).astype(np.uint8)


def _lfw_face(index: int) -> Image.Image:
    return Image.fromarray(_lfw_faces()[index])


@BUILTINS.register("lfw")
def _lfw(label: str | None) -> Source:
    """The 100 LFW faces bundled with scikit-image (25x25 grey)."""
    only_real("builtin:lfw", label)
    items = [
        Item(
            key=f"lfw-{i:03d}",
            split=None,
            label=LABELS["real"],
            load=functools.partial(_lfw_face, i),
            meta={"source": "lfw", "id": i, "label": "real", "dataset": "skimage.data.lfw_subset"},
            origin=f"builtin:lfw#{i}",
        )
        for i in range(len(_lfw_faces()))
    ]
    return Source("builtin:lfw", items, channels=1)
