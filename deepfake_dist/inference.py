"""Image bytes or a PIL image -> the tensor an exported detector expects.

One function feeds every place that scores a user's own image (the HTTP server, ONNX parity,
single-image prediction), so inference sees what training saw: the same mode conversion and
centred square crop + bicubic resize as ``prepare`` (``data.imageio.preprocess``), then the same
``eval_transform`` (scale to [0, 1], normalize) with the model's ``in_channels``, ``resolution``
and ``normalize`` from its JSON.

Uploads are untrusted: ``open_upload`` accepts only a few formats, checks the pixel count from
the header *before* decoding (decompression bombs), and decodes fully so that a truncated file
fails here with a ``BadImage`` that says what is wrong.
"""

from __future__ import annotations

import io
import threading
import warnings

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from deepfake_dist.data import imageio, transforms
from deepfake_dist.errors import UserError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB


class BadImage(UserError):
    """An image that cannot be scored; ``status`` is the HTTP status a server should answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def open_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload") -> Image.Image:
    """Untrusted encoded bytes -> a fully decoded, EXIF-rotated PIL image, or ``BadImage``."""
    if not data:
        raise BadImage(f"{name}: the file is empty; send a JPEG, PNG, WebP or BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(f"{name}: the image has too many pixels (limit {max_pixels})", 413) from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError and whatever a broken header raises
        raise BadImage(f"{name}: not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})", 415) from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}", 413)
    if width < 1 or height < 1:
        raise BadImage(f"{name}: the image has no pixels ({width}x{height})")
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - truncated data, bad chunks, decoder errors
        raise BadImage(f"{name}: the {img.format} image is damaged or truncated ({e})") from None
    finally:
        img.close()


def in_channels(info: dict) -> int:
    """Input channels of an exported detector (its JSON keeps them in ``build_args``)."""
    return int(info.get("build_args", {}).get("in_channels") or info.get("in_channels", 3))


def model_input(img: Image.Image, info: dict) -> torch.Tensor:
    """PIL image -> normalized float tensor (C, R, R) for the model described by ``info``."""
    channels, resolution = in_channels(info), int(info["resolution"])
    face = imageio.preprocess(img, "L" if channels == 1 else "RGB", resolution)
    return transforms.eval_transform(resolution, channels, info["normalize"])(pil_to_tensor(face))


def bytes_to_input(data: bytes, info: dict, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload") -> torch.Tensor:
    return model_input(open_upload(data, max_pixels, name), info)


FACE_MARGIN = 0.25  # of the face box, added on every side before the square crop


_FACES = threading.Lock()


def largest_face(img: Image.Image, margin: float = FACE_MARGIN) -> tuple[Image.Image, dict]:
    """The largest face, found and cropped as ``prepare --source videos:`` does (``data.faces``:
    OpenCV's Haar cascade, a square of ``max(w, h) * (1 + 2 * margin)`` around the box), and what
    was found: ``{"detected", "faces", "box": [x, y, w, h]}``. With no face the whole image comes
    back (``detected`` false), so the caller can still score it."""
    import numpy as np

    from deepfake_dist.data.faces import crop_face, face_detector

    rgb = np.asarray(imageio.to_mode(img, "RGB"))
    with _FACES:  # the server calls this from many threads; OpenCV's detector is shared, not thread-safe
        boxes = face_detector()(rgb)
    if not boxes:
        return img, {"detected": False, "faces": 0, "box": None}
    box = max(boxes, key=lambda b: b[2] * b[3])
    return crop_face(rgb, box, margin), {"detected": True, "faces": len(boxes), "box": [round(v) for v in box]}
