"""``videos:PATH``: videos under ``PATH/{real,fake}/``, ``PATH/{train,val,test}/{real,fake}/``, a
flat folder of one class (``--label``), or a CSV file of ``path,label[,split[,generator]]``.

One video is one ``Item``; its ``load`` cuts it into face clips (or frames) with
``data.faces.video_samples`` and the source's ``VideoOptions``, in the worker that writes its
shard. The video is the unit of splitting, so no video is in two splits.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

from deepfake_dist.data.common import LABELS, SPLIT_DIRS, Item
from deepfake_dist.data.faces import VIDEO_EXTENSIONS, VIDEO_OPTIONS, VideoOptions, check_detector, is_video_file, video_samples
from deepfake_dist.data.sources.base import Source, generator_of, labelled_files, unique_keys
from deepfake_dist.errors import UserError

OPTIONS = VIDEO_OPTIONS


def _read_csv(spec: str, file: Path) -> tuple[list[tuple[Path, str | None, str, str | None]], list[dict[str, str]]]:
    """Rows ``path,label[,split[,generator]]`` (a header line naming the columns is optional);
    paths relative to the CSV's folder. Returns (path, split, label, generator) rows and the
    listed files that are missing."""
    with open(file, newline="", encoding="utf-8") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    columns = ["path", "label", "split", "generator"]
    if rows and rows[0][1][0].strip().lower() == "path":
        columns = [c.strip().lower() for c in rows[0][1]]
        rows = rows[1:]
        if "path" not in columns or "label" not in columns:
            raise UserError(f"{file}:1: the header must name a path and a label column, e.g. path,label,split")
    found, missing = [], []
    for lineno, row in rows:
        fields = dict(zip(columns, (c.strip() for c in row)))
        label, split = fields.get("label", "").lower(), fields.get("split", "").lower()
        label = {"0": "real", "1": "fake"}.get(label, label)
        if label not in LABELS or not fields.get("path"):
            raise UserError(f"{file}:{lineno}: expected path,label[,split] with label real or fake, got {','.join(row)!r}")
        if split and split not in SPLIT_DIRS:
            raise UserError(f"{file}:{lineno}: split {split!r}: expected train, val or test (or nothing)")
        path = Path(fields["path"]).expanduser()
        path = path if path.is_absolute() else file.parent / path
        if not path.is_file():
            missing.append({"input": str(path), "reason": f"listed in {file.name} line {lineno} but missing"})
            continue
        found.append((path, SPLIT_DIRS[split] if split else None, label, fields.get("generator") or None))
    if not found:
        first_missing = f" (first missing: {missing[0]['input']})" if missing else ""
        raise UserError(f"{spec}: {file} lists no existing video{first_missing}")
    return found, missing


def open_videos(arg: str, label: str | None, **options: Any) -> Source:
    """``PATH/{real,fake}/*.mp4``, ``PATH/{train,val,test}/{real,fake}/...``, a flat folder +
    ``--label``, or a CSV file of ``path,label[,split[,generator]]``. Options: ``VideoOptions``."""
    spec = f"videos:{arg}"
    try:
        opts = VideoOptions(**options)
    except TypeError as e:  # an option this source does not know (a caller's typo)
        raise UserError(f"{spec}: {e}") from None
    root = Path(arg).expanduser()
    skipped: list[dict[str, str]] = []
    if root.is_file():
        if label is not None:
            raise UserError(f"--label {label}: {root} gives each video's label; drop --label")
        rows, skipped = _read_csv(spec, root)
        base = root.parent
    elif root.is_dir():
        found = labelled_files(spec, root, label, is_video_file, f"videos ({', '.join(VIDEO_EXTENSIONS)})")
        rows = [(p, split, name, generator_of(p, d) if name == "fake" else None) for p, split, name, d in found]
        base = root
    else:
        raise UserError(f"{spec}: {root} does not exist; give a folder of real/ and fake/ videos or a CSV path,label,split")
    check_detector(opts)
    names = [p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix() for p, *_ in rows]
    items = []
    for (path, split, name, generator), rel, key in zip(rows, names, unique_keys(names)):
        meta: dict[str, Any] = {"source": "videos", "path": rel, "label": name, "video": key}
        if name == "fake":
            meta["generator"] = generator or "unknown"
        items.append(Item(key, split, LABELS[name], functools.partial(video_samples, str(path), opts), meta, str(path)))
    return Source(spec, items, channels=3, skipped=skipped, frames=None if opts.frame_level else opts.frames,
                  preprocessing={"video": opts.settings()})
