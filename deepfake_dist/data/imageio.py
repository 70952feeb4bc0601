"""Image decode / crop / resize / encode, shared by sharding and (later) inference.

Every setting used here is recorded in a shard set's manifest (``PREPROCESSING``), so a set can
be rebuilt bit for bit and a model can be fed the same preprocessing at inference time.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The file extensions a folder source picks up (lower case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

FORMATS = ("jpg", "png")  # shard image formats (also the sample's member extension)
JPEG_SUBSAMPLING = "4:2:0"
RESIZE_FILTER = "bicubic"
_FILTERS = {"bicubic": Image.Resampling.BICUBIC}


def is_image_file(path: Path) -> bool:
    """A visible file with one of ``IMAGE_EXTENSIONS`` (skips ``.DS_Store``, ``._x.jpg``...)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def open_image(path: str | Path) -> Image.Image:
    """Decode a file fully (so a truncated/corrupt file raises here, not later), EXIF-rotated."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def decode(data: bytes) -> Image.Image:
    """Decode encoded image bytes (a shard's ``jpg``/``png`` member)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``"L"`` or ``"RGB"`` (alpha is dropped; palette and 16-bit images converted)."""
    if img.mode == mode:
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey PNGs: keep the high byte
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert(mode)


def center_crop_resize(img: Image.Image, resolution: int, resize_filter: str = RESIZE_FILTER) -> Image.Image:
    """The largest centred square, resized to ``resolution`` x ``resolution``."""
    return ImageOps.fit(img, (resolution, resolution), method=_FILTERS[resize_filter], centering=(0.5, 0.5))


def preprocess(img: Image.Image, mode: str, resolution: int) -> Image.Image:
    """What ``prepare`` does to every image: convert mode, center crop to square, resize."""
    return center_crop_resize(to_mode(img, mode), resolution)


def encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """Encode as ``jpg`` (given quality, 4:2:0 chroma) or ``png`` (lossless)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    elif fmt == "png":
        img.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {FORMATS}")
    return buf.getvalue()
