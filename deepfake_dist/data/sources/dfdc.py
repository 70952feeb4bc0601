"""``dfdc:PATH``: the DeepFake Detection Challenge dataset in its published layout.

    PATH/train/dfdc_train_part_N/metadata.json   {"x.mp4": {"label": "FAKE"|"REAL", "split": "train",
                                                  "original": "y.mp4"}}, the videos beside it
                                                  (or one folder deeper, as some archives unpack)
    PATH/test/labels.csv                         filename,label with 1 = fake; the videos below test/

Either part may be absent (DFDC is mostly used as a test set), not both. The training parts are
split into train and val by original: a fake and its original always land in the same split (a
seeded share of the originals, with all their fakes, is held out for val).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from deepfake_dist.data.faces import VIDEO_OPTIONS
from deepfake_dist.data.sources.base import Source
from deepfake_dist.data.sources.video_sets import (
    Video,
    fingerprints,
    held_out,
    listing,
    missing_video,
    read_json,
    require,
    split_file,
    video_options,
    video_source,
    videos_in,
)
from deepfake_dist.errors import UserError

DATASET = "DFDC"
METADATA, LABELS_CSV = "metadata.json", "labels.csv"
CSV_LABELS = {"0": "real", "1": "fake"}
METHODS = {"real": "original", "fake": "DFDC"}  # the fakes' method is not published
OPTIONS = VIDEO_OPTIONS


def open_dfdc(arg: str, label: str | None, **options: Any) -> Source:
    spec = f"dfdc:{arg}"
    opts = video_options(spec, label, options)
    root = Path(arg).expanduser()
    if not (root / "train").is_dir() and not (root / "test").is_dir():
        require(spec, root, ["train/", "test/"], DATASET)  # names both, and what is there
    found = []  # (videos, skipped, split files) of each part there is
    if (root / "train").is_dir():
        found.append(_train(_metadata_files(spec, root / "train")))
    if (root / "test").is_dir():
        labels = split_file(spec, root / "test" / LABELS_CSV, "the test labels, lines filename,label with 1 = fake")
        found.append(_test(labels, videos_in(root / "test")))
    videos, skipped, files = ([x for part in found for x in part[i]] for i in range(3))
    about = {"split_files": fingerprints(root, *files), "val_by": "original"}
    return video_source(spec, "dfdc", DATASET, root, videos, opts, skipped, about)


def _metadata_files(spec: str, train: Path) -> list[Path]:
    """Each training part's ``metadata.json`` (in the part's folder or one level below it)."""
    parts = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not parts:
        raise UserError(f"{spec}: {train} holds no dfdc_train_part_N/ folder (found {listing(train)})")
    files = []
    for part in parts:
        found = [part / METADATA] if (part / METADATA).is_file() else sorted(part.glob(f"*/{METADATA}"))
        files.append(found[0] if found else split_file(spec, part / METADATA, "the part's labels"))
    return files


def _train(files: list[Path]) -> tuple[list[Video], list[dict[str, str]], list[Path]]:
    """The training parts' videos, each original and its fakes together in train or val."""
    rows = []  # (path, label, original, part)
    for file in files:
        entries = read_json(file, '{"x.mp4": {"label": "FAKE" or "REAL", "original": "y.mp4"}, ...}')
        if not isinstance(entries, dict):
            raise UserError(f"{file}: expected a JSON object of videos, {{\"x.mp4\": {{\"label\": \"FAKE\", ...}}}}")
        for name, entry in sorted(entries.items()):
            kind = str(entry.get("label", "")).lower() if isinstance(entry, dict) else ""
            if kind not in METHODS:
                raise UserError(f"{file}: {name}: label must be REAL or FAKE, got {entry!r}")
            original = (entry.get("original") or name) if kind == "fake" else name
            rows.append((file.parent / name, kind, original, file.parent.name))
    val = held_out({original for _, _, original, _ in rows}, "dfdc:val:originals")
    videos, skipped = [], []
    for path, kind, original, part in rows:
        if not path.is_file():
            skipped.append(missing_video(path, f"{part}/{METADATA}"))
            continue
        meta = {"part": part, **({"original": original} if kind == "fake" else {})}
        videos.append(Video(path, "val" if original in val else "train", kind, METHODS[kind], meta))
    return videos, skipped, files


def _test(file: Path, on_disk: dict[str, Path]) -> tuple[list[Video], list[dict[str, str]], list[Path]]:
    with open(file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise UserError(f"{file}:1: expected the header filename,label")
    videos, skipped = [], []
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) < 2 or row[1].strip() not in CSV_LABELS:
            raise UserError(f"{file}:{lineno}: expected filename,label with label 1 (fake) or 0 (real), got {','.join(row)!r}")
        name, kind = row[0].strip(), CSV_LABELS[row[1].strip()]
        if name not in on_disk:
            skipped.append(missing_video(file.parent / name, f"{LABELS_CSV} line {lineno}"))
            continue
        videos.append(Video(on_disk[name], "test", kind, METHODS[kind]))
    return videos, skipped, [file]
