"""Tiny replicas of FaceForensics++, Celeb-DF v2, DFDC and DFDCP in their published folder names and
split-file formats, for the tests and the ``video_prepare`` benchmark (the real ones cannot be
downloaded here). Each video is a few frames of one of scikit-image's bundled LFW faces, upscaled
so OpenCV's Haar cascade finds it, drifting over a flat background (``video_data.write_video``); a
fake of ``A_B`` shows B's face, with the flicker a frame-by-frame swap leaves.

Every builder returns a ``Replica``: its root and the videos it expects per split and label, and
the files the source must skip (with a word of the reason). The held-out validation share of a
training part is seeded: the layouts are symmetric (every identity, original or video alike) so
the counts are exact whichever group the seed picks.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from skimage.data import lfw_subset
from video_data import FACE, SIZE, write_video

FRAMES = 8  # frames of a replica video
CLASSIC = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
_MISSED = {4, 13, 30, 47, 96}  # LFW faces the Haar cascade misses on some frames of these videos


@dataclass
class Replica:
    """A replica's root, its expected videos per split and label, and the paths (relative to
    root) its source must skip, each with a word of the reason."""

    root: Path
    counts: dict[str, dict[str, int]]
    skipped: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    return (lfw_subset()[:100] * 255).round().astype(np.uint8)  # the first 100 are faces


def portrait(identity: int) -> np.ndarray:
    """Identity ``identity``'s face: an LFW face, upscaled to the pasted size, as RGB."""
    faces = [i for i in range(100) if i not in _MISSED]
    grey = cv2.resize(_lfw()[faces[identity % len(faces)]], (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    return np.stack([grey] * 3, axis=-1)


def _video(path: Path, identity: int, fake: bool = False, frames: int = FRAMES, size: tuple[int, int] = SIZE,
           face: bool = True) -> None:
    write_video(path, frames, fake=fake, face=face, seed=identity + 100 * fake, size=size, fps=25.0,
                portrait=portrait(identity))


def _counts(**splits: tuple[int, int]) -> dict[str, dict[str, int]]:
    return {split: {"real": real, "fake": fake} for split, (real, fake) in splits.items()}


def build_ffpp(root: Path, pairs: tuple[int, int, int] = (2, 1, 1), methods: tuple[str, ...] = CLASSIC,
               compression: str = "c23", frames: int = FRAMES, size: tuple[int, int] = SIZE) -> Replica:
    """``pairs`` id pairs in train, val, test (``000``-``001``, ``002``-``003``, ...): each id's
    real video, and per method both fakes of each pair; plus a real and a fake in no pair."""
    youtube = root / "original_sequences" / "youtube" / compression / "videos"
    ids = iter(range(10**3))
    listed = {}
    for split, n in zip(("train", "val", "test"), pairs):
        listed[split] = [[f"{next(ids):03d}", f"{next(ids):03d}"] for _ in range(n)]
        (root / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text(json.dumps(listed[split]))
    orphans = ["900", "901"]
    for a, b in [p for split in listed.values() for p in split] + [orphans]:
        for target, source in ((a, b), (b, a)):
            _video(youtube / f"{target}.mp4", int(target), frames=frames, size=size)
            for method in methods:
                _video(root / "manipulated_sequences" / method / compression / "videos" / f"{target}_{source}.mp4",
                       int(source), fake=True, frames=frames, size=size)
    skipped = {f"original_sequences/youtube/{compression}/videos/{i}.mp4": "no pair" for i in orphans}
    skipped.update({f"manipulated_sequences/{m}/{compression}/videos/{a}_{b}.mp4": "no pair"
                    for m in methods for a, b in (orphans, orphans[::-1])})
    n = len(methods)
    return Replica(root, _counts(**{s: (2 * k, 2 * k * n) for s, k in zip(("train", "val", "test"), pairs)}), skipped)


def build_celebdf(root: Path, identities: int = 5, frames: int = FRAMES, size: tuple[int, int] = SIZE) -> Replica:
    """``identities`` celebrities in a ring: ``idK_0000`` real, ``idK_idK+1_0000`` fake; 4 YouTube
    videos; the list tests ``id0_0001``, ``id1_id0_0001`` and the first YouTube video (1 = real).
    Whichever identity is held out, val gets its real video and one YouTube video, and the two
    fakes that join it to its neighbours are skipped."""
    lines = []
    for k in range(identities):
        nxt = (k + 1) % identities
        _video(root / "Celeb-real" / f"id{k}_0000.mp4", k, frames=frames, size=size)
        _video(root / "Celeb-synthesis" / f"id{k}_id{nxt}_0000.mp4", nxt, fake=True, frames=frames, size=size)
    for name, identity, fake in (("id0_0001", 0, False), ("id1_id0_0001", 0, True)):
        folder = "Celeb-synthesis" if fake else "Celeb-real"
        _video(root / folder / f"{name}.mp4", identity, fake=fake, frames=frames, size=size)
        lines.append(f"{0 if fake else 1} {folder}/{name}.mp4")
    for n in range(4):
        _video(root / "YouTube-real" / f"{n:05d}.mp4", 50 + n, frames=frames, size=size)
    lines.append("1 YouTube-real/00000.mp4")
    lines.append("0 Celeb-synthesis/id3_id9_0009.mp4")  # listed, not on disk
    (root / "List_of_testing_videos.txt").write_text("\n".join(lines) + "\n")
    counts = _counts(train=(identities - 1 + 2, identities - 2), val=(2, 0), test=(2, 1))
    return Replica(root, counts, {"Celeb-synthesis/id3_id9_0009.mp4": "missing"})


def build_dfdc(root: Path, originals: tuple[int, ...] = (3, 2), frames: int = FRAMES,
               size: tuple[int, int] = SIZE) -> Replica:
    """Training parts of ``originals`` originals each, every one with one fake (the last part
    unpacked one folder deeper); a test part of 2 real and 2 fake videos, a short video (2
    frames, real), a video without a face (fake) and a listed video that is missing."""
    identity = 0
    for number, n in enumerate(originals):
        part = root / "train" / f"dfdc_train_part_{number}"
        if number == len(originals) - 1:
            part = part / f"dfdc_train_part_{number}"
        metadata = {}
        for _ in range(n):
            real, fake = f"r{identity:04d}.mp4", f"f{identity:04d}.mp4"
            _video(part / real, identity, frames=frames, size=size)
            _video(part / fake, identity + 1, fake=True, frames=frames, size=size)
            metadata[real] = {"label": "REAL", "split": "train"}
            metadata[fake] = {"label": "FAKE", "split": "train", "original": real}
            identity += 1
        (part / "metadata.json").write_text(json.dumps(metadata))
    test = root / "test"
    rows = [("t0.mp4", 0), ("t1.mp4", 0), ("t2.mp4", 1), ("t3.mp4", 1), ("short.mp4", 0), ("noface.mp4", 1),
            ("gone.mp4", 1)]
    for name, label in rows[:4]:
        _video(test / "videos" / name, 60 + int(name[1]), fake=bool(label), frames=frames, size=size)
    _video(test / "videos" / "short.mp4", 70, frames=2, size=size)
    _video(test / "videos" / "noface.mp4", 71, fake=True, face=False, frames=frames, size=size)
    with open(test / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    total = sum(originals)
    counts = _counts(train=(total - 1, total - 1), val=(1, 1), test=(3, 3))
    return Replica(root, counts, {"test/gone.mp4": "missing"})


def build_dfdcp(root: Path, train: int = 9, frames: int = FRAMES, size: tuple[int, int] = SIZE) -> Replica:
    """``train`` training videos (a third each real, method_A, method_B: with 9, one is held out
    for val) and 3 test videos, in ``FOLDER/<subject>/<name>.mp4``; plus a listed video that is
    missing and a video that is not listed."""
    index = {}
    folders = ("original_videos", "method_A", "method_B")
    for n in range(train + 3):
        folder = folders[n % 3]
        rel = f"{folder}/{1000 + n}/{n:06d}.mp4"
        _video(root / rel, n, fake=folder != "original_videos", frames=frames, size=size)
        index[rel] = {"label": "real" if folder == "original_videos" else "fake", "set": "train" if n < train else "test"}
    index["method_B/9999/999999.mp4"] = {"label": "fake", "set": "test"}
    _video(root / "method_A" / "8888" / "888888.mp4", 88, fake=True, frames=frames, size=size)
    (root / "dataset.json").write_text(json.dumps(index))
    held = max(1, round(train * 0.1))
    counts = {"train": train - held, "val": held, "test": 3}  # labels of the held-out video vary
    return Replica(root, {split: {"videos": n} for split, n in counts.items()},
                   {"method_B/9999/999999.mp4": "missing", "method_A/8888/888888.mp4": "not listed"})


def write_colour_video(path: Path, frames: int = 4) -> Path:
    """A face on a background whose left half is red and right half blue: a crop that comes out
    with blue on the left had its channels swapped (BGR read as RGB)."""
    w, h = SIZE
    frame = np.zeros((h, w, 3), np.uint8)
    frame[:, : w // 2] = (220, 40, 40)
    frame[:, w // 2 :] = (40, 40, 220)
    x, y = (w - FACE) // 2, (h - FACE) // 2
    frame[y : y + FACE, x : x + FACE] = portrait(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (w, h))
    for _ in range(frames):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
