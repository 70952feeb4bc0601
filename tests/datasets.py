"""Small real data for the tests: the LFW faces that ship with scikit-image, and "fakes" made
from them with the traces generators leave (checkerboard upsampling, smoothing), so that a
detector has something real to learn in a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage.data import lfw_subset


def lfw_faces(n: int = 100) -> list[np.ndarray]:
    """Grey LFW faces as uint8 arrays (25x25)."""
    return [(face * 255).astype(np.uint8) for face in lfw_subset()[:n]]


def toy_fake(face: np.ndarray, seed: int) -> np.ndarray:
    """A face through a crude 'generator': downsample, nearest-neighbour upsample, a periodic
    checkerboard (the transposed-convolution fingerprint) and a little noise."""
    rng = np.random.default_rng(seed)
    small = np.asarray(Image.fromarray(face).resize((12, 12), Image.BILINEAR))
    up = np.asarray(Image.fromarray(small).resize(face.shape[::-1], Image.NEAREST)).astype(np.float32)
    yy, xx = np.mgrid[: face.shape[0], : face.shape[1]]
    checker = 18.0 * (((yy + xx) % 2) * 2 - 1)
    out = up + checker + rng.normal(0, 4, face.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def blurry_fake(face: np.ndarray, seed: int) -> np.ndarray:
    """A face through another crude 'generator', one that over-smooths (as a VAE's decoder
    does): a Gaussian blur and a little noise, no checkerboard."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(face).filter(ImageFilter.GaussianBlur(1.2))).astype(np.float32)
    return np.clip(smooth + rng.normal(0, 3, face.shape), 0, 255).astype(np.uint8)


def write_face_folder(root: Path, n_real: int = 40, n_fake: int = 40) -> Path:
    """``root/{real,fake}/*.png`` from LFW faces, split later by ``--split``."""
    faces = lfw_faces()
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(n_real):
        Image.fromarray(faces[i % len(faces)]).save(root / "real" / f"face_{i:03d}.png")
    for i in range(n_fake):
        Image.fromarray(toy_fake(faces[(i + 50) % len(faces)], i)).save(root / "fake" / f"face_{i:03d}.png")
    return root
