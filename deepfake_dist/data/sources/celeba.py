"""``celeba:PATH``: CelebA's aligned faces in the official release layout, with its official
train/val/test split; attributes and bounding boxes go into each sample's ``json``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from deepfake_dist.data.common import LABELS, SPLITS, Item
from deepfake_dist.data.imageio import IMAGE_EXTENSIONS, open_image
from deepfake_dist.data.sources.base import Source, only_real, unique_keys
from deepfake_dist.errors import UserError

_CELEBA_HINT = (
    "CelebA is not downloaded automatically: put img_align_celeba/ and list_eval_partition.txt "
    "(optionally list_attr_celeba.txt, list_bbox_celeba.txt) in that folder"
)


def _find_file(root: Path, name: str) -> Path | None:
    """Official CelebA files sit in the root or in the Anno/ and Eval/ folders of the release."""
    for folder in (root, root / "Eval", root / "Anno"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_table(path: Path, skip: int, ncols: int | None) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows after ``skip`` header lines, as (line number, fields)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if lineno <= skip or not fields:
                continue
            if ncols is not None and len(fields) != ncols:
                raise UserError(
                    f"{path}:{lineno}: expected {ncols} fields, got {len(fields)}; "
                    "is this the official CelebA file?"
                )
            rows.append((lineno, fields))
    return rows


def _ints(path: Path, lineno: int, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"{path}:{lineno}: expected integers, got {' '.join(values)!r}") from None


def open_celeba(arg: str, label: str | None) -> Source:
    """CelebA aligned faces with the official split; attributes and bbox go into ``meta``."""
    spec = f"celeba:{arg}"
    only_real(spec, label)
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise UserError(f"{spec}: folder {root} does not exist; {_CELEBA_HINT}")
    img_dir = next((d for d in (root / "img_align_celeba", root / "Img" / "img_align_celeba") if d.is_dir()), None)
    if img_dir is None:
        raise UserError(f"{spec}: missing {root / 'img_align_celeba'}/; {_CELEBA_HINT}")
    if (img_dir / "img_align_celeba").is_dir():  # the Kaggle zip nests it once more
        img_dir = img_dir / "img_align_celeba"
    partition = _find_file(root, "list_eval_partition.txt")
    if partition is None:
        raise UserError(f"{spec}: missing {root / 'list_eval_partition.txt'} (the official split); {_CELEBA_HINT}")

    splits: dict[str, str] = {}
    for lineno, (name, code) in _read_table(partition, skip=0, ncols=2):
        if code not in ("0", "1", "2"):
            raise UserError(f"{partition}:{lineno}: split must be 0 (train), 1 (val) or 2 (test), got {code!r}")
        splits[name] = SPLITS[int(code)]

    attributes: dict[str, dict[str, int]] = {}
    attr_file = _find_file(root, "list_attr_celeba.txt")
    if attr_file is not None:
        with open(attr_file, encoding="utf-8") as f:
            f.readline()
            names = f.readline().split()
        for lineno, fields in _read_table(attr_file, skip=2, ncols=len(names) + 1):
            values = _ints(attr_file, lineno, fields[1:])
            attributes[fields[0]] = {n: int(v > 0) for n, v in zip(names, values)}  # -1 -> 0

    bboxes: dict[str, list[int]] = {}
    bbox_file = _find_file(root, "list_bbox_celeba.txt")
    if bbox_file is not None:
        for lineno, fields in _read_table(bbox_file, skip=2, ncols=5):
            bboxes[fields[0]] = _ints(bbox_file, lineno, fields[1:])

    on_disk = {p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    listed = sorted(n for n in splits if n in on_disk)
    if not listed:
        raise UserError(
            f"{spec}: none of the {len(splits)} images listed in {partition} is in {img_dir}; "
            "point celeba:PATH at the folder holding img_align_celeba/"
        )
    skipped = [
        {"input": str(img_dir / n), "reason": f"listed in {partition.name} but missing from {img_dir.name}/"}
        for n in sorted(set(splits) - on_disk)
    ] + [
        {"input": str(img_dir / n), "reason": f"not listed in {partition.name} (no official split)"}
        for n in sorted(on_disk - set(splits))
    ]
    items = []
    for name, key in zip(listed, unique_keys(listed)):
        meta: dict[str, Any] = {"source": "celeba", "id": name, "label": "real"}
        if name in attributes:
            meta["attributes"] = attributes[name]
        if name in bboxes:
            meta["bbox"] = bboxes[name]  # x, y, w, h in the original (in-the-wild) image
        path = str(img_dir / name)
        items.append(Item(f"celeba-{key}", splits[name], LABELS["real"], functools.partial(open_image, path), meta, path))
    return Source(spec, items, channels=3, skipped=skipped)
