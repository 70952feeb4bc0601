"""``celebdf:PATH``: Celeb-DF (v2) in its published layout, with its official test list.

    PATH/Celeb-real/idA_NNNN.mp4           real, celebrity idA
    PATH/Celeb-synthesis/idA_idB_NNNN.mp4  fake, idA's video with idB's face
    PATH/YouTube-real/NNNNN.mp4            real, no identity given
    PATH/List_of_testing_videos.txt        lines "<label> <folder>/<name>.mp4", where 1 = real, 0 = fake

Test is the list. The other videos are split into train and val by identity, so that no identity
is on both sides: a seeded share of the identities is held out for val, a fake whose two
identities fall on different sides is skipped and listed, and the YouTube videos (no identity)
are held out one by one. Videos may also sit one folder deeper (``Celeb-real/videos/``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deepfake_dist.data.faces import VIDEO_OPTIONS
from deepfake_dist.data.sources.base import Source
from deepfake_dist.data.sources.video_sets import (
    Video,
    fingerprints,
    held_out,
    missing_video,
    require,
    split_file,
    video_options,
    video_source,
    videos_in,
)
from deepfake_dist.errors import UserError

DATASET = "Celeb-DF-v2"
FOLDERS = {"Celeb-real": "real", "Celeb-synthesis": "fake", "YouTube-real": "real"}
TEST_LIST = "List_of_testing_videos.txt"
LIST_LABELS = {"1": "real", "0": "fake"}  # the list's own convention
OPTIONS = VIDEO_OPTIONS


def open_celebdf(arg: str, label: str | None, **options: Any) -> Source:
    spec = f"celebdf:{arg}"
    opts = video_options(spec, label, options)
    root = Path(arg).expanduser()
    require(spec, root, [f"{f}/" for f in FOLDERS], DATASET)
    listed = split_file(spec, root / TEST_LIST, "the official test list, lines '<label> <folder>/<name>.mp4'")
    on_disk = {f"{folder}/{name}": path for folder in FOLDERS
               for name, path in videos_in(root / folder).items()}
    test = _test_list(listed)

    videos, skipped = [], []
    for rel, lineno in test.items():
        if rel in on_disk:
            videos.append(_video(on_disk[rel], rel, "test"))
        else:
            skipped.append(missing_video(root / rel, f"{TEST_LIST} line {lineno}"))
    rest = sorted(set(on_disk) - set(test))
    val_ids = held_out({i for rel in rest for i in _identities(rel)}, "celebdf:val:identities")
    val_unnamed = held_out({rel for rel in rest if not _identities(rel)}, "celebdf:val:videos")
    for rel in rest:
        ids = _identities(rel)
        sides = {i in val_ids for i in ids} if ids else {rel in val_unnamed}
        if len(sides) > 1:
            held = ", ".join(f"{i} ({'val' if i in val_ids else 'train'})" for i in ids)
            skipped.append({"input": str(on_disk[rel]), "reason": f"its identities {held} are on both sides of the "
                                                                  "train/val split"})
            continue
        videos.append(_video(on_disk[rel], rel, "val" if sides == {True} else "train"))
    about = {"split_files": fingerprints(root, listed), "val_by": "identity"}
    return video_source(spec, "celebdf", DATASET, root, videos, opts, skipped, about)


def _identities(rel: str) -> list[str]:
    """The celebrities of a video: ``id0`` in ``Celeb-real/id0_0001``, both in ``id0_id16_0001``."""
    return [part for part in Path(rel).stem.split("_") if re.fullmatch(r"id\d+", part)]


def _video(path: Path, rel: str, split: str) -> Video:
    folder = rel.split("/", 1)[0]
    ids = _identities(rel)
    return Video(path, split, FOLDERS[folder], folder, {"identities": ids} if ids else {})


def _test_list(path: Path) -> dict[str, int]:
    """``folder/name`` -> line number of each listed video; a label that contradicts its folder
    (the list says 1 = real, 0 = fake) is an error naming the line."""
    listed: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        folder = fields[-1].split("/", 1)[0]
        if len(fields) != 2 or fields[0] not in LIST_LABELS or folder not in FOLDERS or "/" not in fields[1]:
            raise UserError(f"{path}:{lineno}: expected '<1 real | 0 fake> <folder>/<name>.mp4' with a folder of "
                            f"{', '.join(FOLDERS)}, got {line.strip()!r}")
        if LIST_LABELS[fields[0]] != FOLDERS[folder]:
            raise UserError(f"{path}:{lineno}: label {fields[0]} ({LIST_LABELS[fields[0]]}) for a video in {folder}/ "
                            f"({FOLDERS[folder]}); this list's convention is 1 = real, 0 = fake")
        rel = f"{folder}/{Path(fields[1]).name}"
        listed.setdefault(rel, lineno)
    return listed
