"""What every source kind shares: the ``Source`` it returns, its sample keys, and the folder
layouts of real and fake files (``{train,val,test}/{real,fake}/``, ``{real,fake}/``, flat)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepfake_dist.data.common import LABELS, SPLIT_DIRS, Item
from deepfake_dist.errors import UserError


@dataclass
class Source:
    """An opened source: its items, its colour hint and the inputs rejected while listing.

    ``frames``: images per sample when they are clips (``None``: one image per sample);
    ``preprocessing``: the source's own settings, recorded in the manifest's ``preprocessing``;
    ``resolution``, ``shard_size``: what ``prepare`` uses when its caller gives none (``None``:
    prepare's own defaults), for kinds whose field has a standard (the benchmark datasets)."""

    spec: str
    items: list[Item]
    channels: int | None = None  # 1 grey, 3 colour, None unknown (sharded as RGB)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"input", "reason"}
    frames: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None
    shard_size: int | None = None  # inputs (videos) a shard

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def safe_key(text: str) -> str:
    """A webdataset-safe key: no dots (they start the member extension), no slashes."""
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", part) for part in Path(text).with_suffix("").parts]
    return "-".join(p.strip("_") or "_" for p in parts)


def unique_keys(names: list[str]) -> list[str]:
    """``safe_key`` of each name; keys that collide get a short hash of their own name."""
    keys = [safe_key(n) for n in names]
    counts = Counter(keys)
    return [
        f"{k}-{hashlib.sha1(n.encode()).hexdigest()[:8]}" if counts[k] > 1 else k
        for k, n in zip(keys, names)
    ]


def only_real(spec: str, label: str | None) -> None:
    if label not in (None, "real"):
        raise UserError(f"--label {label}: source {spec} holds real faces only; drop --label")


def _files_under(folder: Path, root: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Accepted files below ``folder``, recursively, skipping hidden files and folders."""
    return sorted(
        p for p in folder.rglob("*")
        if accept(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _subdirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def labelled_files(spec: str, root: Path, label: str | None, accept: Callable[[Path], bool],
                   what: str) -> list[tuple[Path, str | None, str, Path]]:
    """(path, split or None, label name, label folder) of every accepted file under ``root``
    laid out as ``{train,val,test}/{real,fake}/``, ``{real,fake}/`` or flat (+ ``label``)."""
    subdirs = _subdirs(root)
    split_dirs = {SPLIT_DIRS[n]: p for n, p in subdirs.items() if n in SPLIT_DIRS}
    label_dirs = {n: p for n, p in subdirs.items() if n in LABELS}
    if split_dirs and label_dirs:
        raise UserError(
            f"{spec}: {root} has both split folders ({', '.join(sorted(split_dirs))}) and label "
            f"folders ({', '.join(sorted(label_dirs))}); use one layout"
        )
    if (split_dirs or label_dirs) and label is not None:
        raise UserError(
            f"--label {label}: {root} has real/ and fake/ folders, which give the labels; "
            "--label is only for a flat folder of one class"
        )

    # (path, split, label name, folder the label applies to)
    found: list[tuple[Path, str | None, str, Path]] = []
    if split_dirs:
        for split, split_dir in sorted(split_dirs.items()):
            labels = {n: p for n, p in _subdirs(split_dir).items() if n in LABELS}
            if not labels:
                raise UserError(f"{spec}: {split_dir} has no real/ or fake/ folder; "
                                f"expected {split_dir}/real/*, {split_dir}/fake/*")
            found += [(p, split, name, d) for name, d in sorted(labels.items()) for p in _files_under(d, root, accept)]
    elif label_dirs:
        found += [(p, None, name, d) for name, d in sorted(label_dirs.items()) for p in _files_under(d, root, accept)]
    elif label is None:
        raise UserError(
            f"{spec}: {root} has no real/ or fake/ folders (nor train/ val/ test/); to shard it as "
            "one class pass --label real or --label fake"
        )
    else:
        found += [(p, None, label, root) for p in _files_under(root, root, accept)]
    if not found:
        raise UserError(f"{spec}: no {what} found under {root}")
    return found


def generator_of(path: Path, label_dir: Path) -> str:
    """A fake's generator: the subfolder of ``fake/`` it sits in (``fake/stylegan2/x.png``)."""
    inner = path.relative_to(label_dir).parts
    return inner[0] if len(inner) > 1 else "unknown"
