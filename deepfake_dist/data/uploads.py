"""Untrusted image bytes (an upload to the server) -> a decoded PIL image, or a ``BadImage``;
and an uploaded video's length, read from its container before any frame is decoded.

``open_upload`` accepts only a few formats, checks the pixel count from the header *before*
decoding (decompression bombs), and decodes fully so that a truncated file fails here with a
``BadImage`` that says what is wrong (a PNG whose data ends early included,
which Pillow decodes without complaint). Given the side the model needs, a large JPEG is decoded
at a reduced scale (Pillow's ``draft``: 1/2 to 1/8, in the decoder), which spares the server
most of its memory and time; other formats cannot be decoded smaller.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

from PIL import Image, ImageOps

from deepfake_dist.errors import UserError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB
REDUCE_GAP = 8  # a JPEG is decoded no smaller than this many times the model's input side, so
# the bicubic resize after it still averages over many pixels, as on the full image


class BadImage(UserError):
    """An image that cannot be scored; ``status`` is the HTTP status a server should answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def pillow_pixel_limit() -> int | None:
    """The pixel count over which Pillow refuses to open an image (``DecompressionBombError``)."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """The image's header, read lazily (nothing decoded), checked against ``max_pixels``."""
    if not data:
        raise BadImage(f"{name}: the file is empty; send a JPEG, PNG, WebP or BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:  # over Pillow's own limit, whatever max_pixels says
        raise BadImage(f"{name}: refused before decoding, as Pillow refuses possible decompression bombs ({e})",
                       413) from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError and whatever a broken header raises
        raise BadImage(f"{name}: not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})", 415) from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise BadImage(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}", 413)
    if width < 1 or height < 1:
        img.close()
        raise BadImage(f"{name}: the image has no pixels ({width}x{height})")
    return img


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload") -> tuple[int, int]:
    """Width and height from the header alone, or ``BadImage`` (what ``open_upload`` would refuse
    before decoding): to size up a request before decoding any of it."""
    img = _open(data, max_pixels, name)
    img.close()
    return img.size


def open_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload",
                min_side: int | None = None) -> Image.Image:
    """Untrusted encoded bytes -> a fully decoded, EXIF-rotated PIL image, or ``BadImage``. With
    ``min_side``, a JPEG is decoded at the smallest of its 1/1 to 1/8 scales whose shorter side
    is still at least ``min_side`` (a scale the model's resize then averages away)."""
    img = _open(data, max_pixels, name)
    try:
        if min_side and img.format == "JPEG":
            scale = min_side / min(img.size)
            img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img.load()
        if img.format == "PNG" and not _png_rows_complete(data):
            raise ValueError("its image data ends before its last row")
        ImageOps.exif_transpose(img, in_place=True)  # not a copy: one decoded image in memory
        return img
    except Exception as e:  # noqa: BLE001 - truncated data, bad chunks, decoder errors
        img.close()
        raise BadImage(f"{name}: the {img.format} image is damaged or truncated ({e})") from None


def video_seconds(path, name: str = "upload") -> float:
    """How long a video file says it is (the longest of its container's and its video stream's
    durations, or its frame count over its frame rate), from the headers alone (PyAV); a file
    that is not a video, or that does not say, is a ``BadImage`` (415)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadImage(f"{name}: no video stream in it; send a video (mp4, mov, mkv, webm, ...)", 415)
            stream = container.streams.video[0]
            known = [container.duration / 1e6 if container.duration else 0.0,
                     float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0,
                     stream.frames / float(stream.average_rate) if stream.frames and stream.average_rate else 0.0]
    except av.FFmpegError as err:
        raise BadImage(f"{name}: not a video FFmpeg can read ({type(err).__name__})", 415) from None
    if not max(known) > 0:
        raise BadImage(f"{name}: its container does not say how long it is; re-encode it (e.g. ffmpeg -i IN OUT.mp4)",
                       415)
    return max(known)


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_rows_complete(data: bytes) -> bool:
    """Whether a PNG's image data (its IDAT chunks, inflated) holds every row its header declares.
    Pillow decodes a zlib stream that ends early without an error, the missing rows left black."""
    pos, header, chunks = 8, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = data[pos + 8:pos + 21]
        elif kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) < 13:
        return False
    width, height, depth, colour, interlace = struct.unpack(">IIBB2xB", header)
    bits = depth * _CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + (columns * bits + 7) // 8)  # each row: a filter byte, then its pixels
    inflater, produced = zlib.decompressobj(), 0
    try:
        for chunk in chunks:
            while chunk and produced < expected:  # a megabyte at a time: counted, not kept
                produced += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
    except zlib.error:
        return False
    return produced >= expected
