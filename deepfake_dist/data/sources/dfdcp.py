"""``dfdcp:PATH``: the DFDC preview dataset in its published layout.

    PATH/original_videos/..., PATH/method_A/..., PATH/method_B/...   the videos
    PATH/dataset.json   {"method_A/.../x.mp4": {"label": "fake", "set": "train"}, ...}: keys are paths
                        under PATH, ``label`` real or fake, ``set`` train or test

Test is the ``test`` set; a seeded share of the ``train`` videos is held out for val. A listed
video that is missing, or a video on disk that is not listed, is skipped and listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepfake_dist.data.faces import VIDEO_OPTIONS
from deepfake_dist.data.sources.base import Source
from deepfake_dist.data.sources.video_sets import (
    Video,
    fingerprints,
    held_out,
    missing_video,
    read_json,
    require,
    split_file,
    video_options,
    video_source,
    videos_in,
)
from deepfake_dist.errors import UserError

DATASET = "DFDCP"
FOLDERS = {"original_videos": "real", "method_A": "fake", "method_B": "fake"}
INDEX = "dataset.json"
ENTRY = '{"method_A/.../x.mp4": {"label": "real" or "fake", "set": "train" or "test"}, ...}'
OPTIONS = VIDEO_OPTIONS


def open_dfdcp(arg: str, label: str | None, **options: Any) -> Source:
    spec = f"dfdcp:{arg}"
    opts = video_options(spec, label, options)
    root = Path(arg).expanduser()
    require(spec, root, [f"{f}/" for f in FOLDERS], DATASET)
    index = split_file(spec, root / INDEX, f"the labels and sets of the videos, {ENTRY}")
    listed = _entries(index)
    on_disk = {path.relative_to(root).as_posix(): path for folder in FOLDERS
               for path in videos_in(root / folder).values()}

    skipped = [missing_video(root / rel, INDEX) for rel in sorted(set(listed) - set(on_disk))]
    skipped += [{"input": str(on_disk[rel]), "reason": f"not listed in {INDEX}"} for rel in sorted(set(on_disk) - set(listed))]
    present = sorted(set(listed) & set(on_disk))
    val = held_out({rel for rel in present if listed[rel] == "train"}, "dfdcp:val:videos")
    videos = []
    for rel in present:
        folder = rel.split("/", 1)[0]
        split = "val" if rel in val else listed[rel]
        videos.append(Video(on_disk[rel], split, FOLDERS[folder], folder))
    about = {"split_files": fingerprints(root, index), "val_by": "video"}
    return video_source(spec, "dfdcp", DATASET, root, videos, opts, skipped, about)


def _entries(file: Path) -> dict[str, str]:
    """Each listed video's set (``train`` or ``test``), by its path under the dataset's root; a
    label that contradicts its folder (fakes in ``method_*/``, reals in ``original_videos/``) is
    an error naming the key."""
    entries = read_json(file, ENTRY)
    if not isinstance(entries, dict):
        raise UserError(f"{file}: expected a JSON object {ENTRY}")
    sets = {}
    for key, entry in entries.items():
        folder = key.split("/", 1)[0]
        value = entry if isinstance(entry, dict) else {}
        kind, split = str(value.get("label", "")).lower(), str(value.get("set", "")).lower()
        if folder not in FOLDERS or kind not in ("real", "fake") or split not in ("train", "test"):
            raise UserError(f"{file}: {key}: expected a path under {', '.join(FOLDERS)} with label real or fake and "
                            f"set train or test, got {entry!r}")
        if FOLDERS[folder] != kind:
            raise UserError(f"{file}: {key}: label {kind} for a video in {folder}/, which holds {FOLDERS[folder]} ones")
        sets[key] = split
    return sets
