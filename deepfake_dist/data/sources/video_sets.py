"""What the published deepfake video datasets (``ffpp``, ``celebdf``, ``dfdc``, ``dfdcp``, ``fakeavceleb``) share.

- Frames as DeepfakeBench takes them: 32 a video spread uniformly over it, one sample a frame,
  the largest face track cropped square at 1.3x its box, 256 px (``DEFAULTS``; every
  ``VideoOptions`` field can be overridden). A video shorter than 32 frames keeps the frames it
  has and is listed in the manifest with its count; a video without a face is skipped and listed.
- Each sample's ``json``: ``source`` (the kind), ``dataset``, ``method`` (the manipulation, or the
  real videos' folder), ``video`` (its id, for video-level scores), ``path``, ``label``,
  ``generator`` (= method, for fakes: evaluation's per-source rows) and the frame's index
  (``frame``), plus what the dataset adds (compression, identities, original).
- Layout checks that fail in one line naming what was expected and what is there.
- Validation carved out of a training part by group (an identity, an original and its fakes, a
  video): ``held_out`` puts a seeded ``VAL_SHARE`` of the groups in val, so no group is on both
  sides. These datasets publish train and test only (DeepfakeBench validates on test).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepfake_dist.data.common import LABELS, Item
from deepfake_dist.data.faces import VideoOptions, check_detector, is_video_file, video_samples
from deepfake_dist.data.manifest import file_sha256
from deepfake_dist.data.sources.base import Source, unique_keys
from deepfake_dist.errors import UserError

DEFAULTS = {"frames": 32, "clips_per_video": 1, "sampling": "uniform", "frame_level": True, "margin": 0.15}
RESOLUTION = 256
SHARD_SIZE = 32  # videos a shard (a thousand frames): enough shards for many workers x ranks
VAL_SHARE = 0.1  # of a training part's groups, held out for validation


@dataclass(frozen=True)
class Video:
    """One video of a dataset, placed: its file, split, label ("real"/"fake"), method (the
    manipulation, or the folder of real videos) and what the dataset records besides."""

    path: Path
    split: str
    label: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    members: dict[str, bytes] = field(default_factory=dict)  # extra tar members of its samples (``Item.members``)
    name: str | None = None  # what its key is made from; None: ``method/file name``


def video_options(spec: str, label: str | None, options: dict[str, Any],
                  defaults: dict[str, Any] = DEFAULTS) -> VideoOptions:
    """``defaults`` (DeepfakeBench's frames) overridden by ``options``; a frame-level set keeps
    short videos. Checks the face detector now, so a bad one fails before any video is listed."""
    if label is not None:
        raise UserError(f"--label {label}: {spec} gives each video's label; drop --label")
    merged = {**defaults, **options}
    merged.setdefault("keep_short", bool(merged["frame_level"]))
    opts = VideoOptions(**merged)
    check_detector(opts)
    return opts


def video_source(spec: str, kind: str, dataset: str, root: Path, videos: list[Video], opts: VideoOptions,
                 skipped: list[dict[str, str]], about: dict[str, Any]) -> Source:
    """The ``Source`` of these videos: one ``Item`` each (cut into faces in the worker that writes
    its shard). ``about``: the dataset's settings for the manifest (split files, compression...)."""
    if not videos:
        first = f" (first skipped: {skipped[0]['input']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"{spec}: no video to prepare under {root}{first}")
    keys = unique_keys([v.name or f"{v.method}/{v.path.name}" for v in videos])
    items = []
    for video, key in zip(videos, keys):
        meta = {"source": kind, "dataset": dataset, "method": video.method, "video": key,
                "path": video.path.relative_to(root).as_posix(), "label": video.label, **video.meta}
        if video.label == "fake":
            meta["generator"] = video.method
        items.append(Item(key, video.split, LABELS[video.label], functools.partial(video_samples, str(video.path), opts),
                          meta, str(video.path), video.members))
    return Source(spec, items, channels=3, skipped=skipped, frames=None if opts.frame_level else opts.frames,
                  preprocessing={"video": opts.settings(), "dataset": {"name": dataset, "val_share": VAL_SHARE, **about}},
                  resolution=RESOLUTION, shard_size=SHARD_SIZE)


# ----------------------------------------------------------------------------------- layout


def listing(folder: Path, limit: int = 8) -> str:
    """What ``folder`` holds, for an error message (folders end in ``/``)."""
    if not folder.is_dir():
        return "nothing (no such folder)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "an empty folder"


def require(spec: str, root: Path, expected: list[str], dataset: str) -> None:
    """``root`` must hold every one of ``expected`` (relative paths; folders end in ``/``)."""
    if not root.is_dir():
        raise UserError(f"{spec}: folder {root} does not exist; point it at the {dataset} folder holding "
                        f"{', '.join(expected)}")
    missing = [e for e in expected if not ((root / e).is_dir() if e.endswith("/") else (root / e).is_file())]
    if missing:
        raise UserError(f"{spec}: {root} is not the {dataset} layout: no {', '.join(missing)} "
                        f"(expected {', '.join(expected)}; found {listing(root)})")


def split_file(spec: str, path: Path, what: str) -> Path:
    """The dataset's split file ``path``, or one line naming it."""
    if not path.is_file():
        raise UserError(f"{spec}: missing the split file {path} ({what})")
    return path


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable as JSON ({err}); expected {what}") from None


def videos_in(folder: Path) -> dict[str, Path]:
    """Video files below ``folder`` (any depth, hidden ones left out), by file name."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if is_video_file(path) and not any(p.startswith(".") for p in path.relative_to(folder).parts):
            found.setdefault(path.name, path)
    return found


def fingerprints(root: Path, *files: Path) -> dict[str, str]:
    """The split files' sha256 by path under ``root``, for the manifest: which split made the set."""
    return {f.relative_to(root).as_posix(): file_sha256(f) for f in files}


# ------------------------------------------------------------------------------------ splits


def held_out(groups: set[str], seed: str) -> set[str]:
    """A seeded ``VAL_SHARE`` of ``groups`` (at least one when there are two), for validation."""
    ordered = sorted(groups)
    random.Random(seed).shuffle(ordered)
    n = max(1, round(len(ordered) * VAL_SHARE)) if len(ordered) > 1 else 0
    return set(ordered[:n])


def missing_video(path: Path, where: str) -> dict[str, str]:
    return {"input": str(path), "reason": f"listed in {where} but missing"}
