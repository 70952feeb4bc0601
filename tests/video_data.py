"""Small mp4 files for the video tests and benchmark: a real face (the astronaut portrait that
ships with scikit-image, which OpenCV's Haar cascade detects) moving over a flat background
whose grey level encodes the frame index, so a crop's corner tells which frame it came from.
"Fake" videos blend the face with a shifted copy of itself and add noise, different on every
frame (the flicker a frame-by-frame face swap leaves)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from skimage.data import astronaut

SIZE = (160, 120)  # frame width, height
FACE = 56  # pasted face square, pixels


def level(index: int) -> int:
    """Background grey level of frame ``index`` (distinct for 0..23, then it repeats)."""
    return 20 + 9 * (index % 24)


def _phase(index: int) -> int:
    """0, 1, ..., 23, 22, ..., 1, 0, 1, ...: the face drifts back and forth in longer videos."""
    return min(index % 46, 46 - index % 46)


@lru_cache(maxsize=1)
def _face() -> np.ndarray:
    x, y, side, pad = 177, 66, 95, 12  # the Haar box of the astronaut's face, plus some context
    crop = astronaut()[y - pad : y + side + pad, x - pad : x + side + pad]
    return cv2.resize(crop, (FACE, FACE), interpolation=cv2.INTER_AREA)


def face_frames(frames: int, fake: bool = False, face: bool = True, seed: int = 0, size: tuple[int, int] = SIZE,
                portrait: np.ndarray | None = None):
    """``frames`` RGB frames; the face drifts right and down by a seeded amount. ``portrait``: the
    face to paste (RGB, square), the astronaut's by default. Also yields, with each frame, the
    face's box (x, y, side) on it."""
    rng = np.random.default_rng(seed)
    w, h = size
    scale = min(w / SIZE[0], h / SIZE[1])
    x0, y0 = (30 + rng.integers(0, 6)) * scale, (26 + rng.integers(0, 4)) * scale
    dx, dy = (1.5 + rng.random()) * scale, (0.3 + 0.3 * rng.random()) * scale
    side = round(FACE * scale)
    portrait = _face() if portrait is None else portrait
    base = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    for i in range(frames):
        frame = np.full((h, w, 3), level(i), np.uint8)
        x, y = int(x0 + dx * _phase(i)), int(y0 + dy * _phase(i))
        if face:
            patch = base
            if fake:
                shifted = np.roll(base, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
                alpha = 0.3 + 0.2 * rng.random()
                patch = (1 - alpha) * base + alpha * shifted + rng.normal(0, 10, base.shape)
            frame[y : y + side, x : x + side] = np.clip(patch, 0, 255).astype(np.uint8)
        yield frame, (x, y, side)


def write_video(path: Path, frames: int = 24, fake: bool = False, face: bool = True, seed: int = 0,
                size: tuple[int, int] = SIZE, fps: float = 10.0, portrait: np.ndarray | None = None) -> Path:
    """Write an mp4 (mp4v) of ``face_frames``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame, _ in face_frames(frames, fake, face, seed, size, portrait):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_video_folder(root: Path, real: int = 3, fake: int = 3, frames: int = 24) -> Path:
    """``root/real/r{i}.mp4`` and ``root/fake/swap/f{i}.mp4`` (generator "swap"); returns root."""
    for i in range(real):
        write_video(root / "real" / f"r{i}.mp4", frames, seed=i)
    for i in range(fake):
        write_video(root / "fake" / "swap" / f"f{i}.mp4", frames, fake=True, seed=100 + i)
    return root
