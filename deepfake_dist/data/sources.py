"""Where raw faces come from: ``SOURCES``, a registry of source kinds, and ``open_source``.

A source spec is ``KIND:ARG`` (``builtin:lfw``, ``celeba:PATH``, ``folder:PATH``, ``videos:PATH``).
Opening one lists its inputs without decoding them: each ``Item`` carries a picklable ``load``
callable, so the decode happens later, in whichever worker process writes that item's shard.
An input usually yields one image; one that yields several samples (the clips of a video) returns
``Expanded`` from ``load``.

A new kind is one decorated function (``options=True`` if it takes keyword options, which
``prepare(options=...)`` passes through)::

    @SOURCES.register("mykind", usage="mykind:PATH")
    def _mykind(arg: str, label: str | None) -> Source: ...
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from deepfake_dist.data.imageio import IMAGE_EXTENSIONS, is_image_file, open_image
from deepfake_dist.errors import UserError
from deepfake_dist.registry import Registry

SPLITS = ("train", "val", "test")
LABELS = {"real": 0, "fake": 1}
LABEL_NAMES = ("real", "fake")  # index = the sample's ``cls``
# Folder names accepted for a fixed split (lower-cased before lookup).
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

SOURCES = Registry("source")
BUILTINS = Registry("builtin dataset")


@dataclass(frozen=True)
class Item:
    """One input (an image, or a video that yields several samples), not yet decoded.

    key:   unique within the source, stable across runs, filesystem-safe (``[A-Za-z0-9_-]``).
    split: ``"train" | "val" | "test"``, or ``None`` when the source does not fix it.
    label: 0 real, 1 fake.
    load:  picklable callable returning the decoded ``PIL.Image``, or ``Expanded`` for an input
           that yields several samples (raises if the file is bad or yields nothing).
    meta:  JSON-serialisable: ``source``, ``path`` or ``id``, ``label``, ``generator`` (fakes),
           ``attributes`` / ``bbox`` when known. Stored as the sample's ``json``.
    origin: where it came from, for messages (a file path, ``builtin:lfw#3``); not stored.
    """

    key: str
    split: str | None
    label: int
    load: Callable[[], Image.Image] = field(repr=False, compare=False)
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


@dataclass
class Sample:
    """One of the samples an input yields: its key is the item's key + ``suffix``; ``image`` is
    one image or a list (a clip, stored as members ``f000.<fmt>``, ``f001.<fmt>``, ... in order);
    ``meta`` is merged over the item's meta in the sample's ``json``."""

    suffix: str
    image: Image.Image | list[Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Expanded:
    """What ``Item.load`` returns for an input with several samples, and the parts of it that
    yielded none (``{"part", "reason"}``; the manifest lists them under ``skipped``)."""

    samples: list[Sample]
    dropped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Source:
    """An opened source: its items, its colour hint and the inputs rejected while listing.

    ``frames``: images per sample when they are clips (``None``: one image per sample);
    ``preprocessing``: the source's own settings, recorded in the manifest's ``preprocessing``."""

    spec: str
    items: list[Item]
    channels: int | None = None  # 1 grey, 3 colour, None unknown (sharded as RGB)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"input", "reason"}
    frames: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def open_source(spec: str, label: str | None = None, options: dict[str, Any] | None = None) -> Source:
    """Parse ``KIND:ARG`` and list the source's items. ``label`` ("real"/"fake") is only for a
    flat folder; ``options`` go to kinds registered with ``options=True`` (``videos``).
    Raises ``UserError`` naming the spec, path or file at fault."""
    if label is not None and label not in LABELS:
        raise UserError(f"--label {label!r}: expected 'real' or 'fake'")
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise UserError(f"--source {spec!r}: expected KIND:ARG, one of: {usage()}")
    try:
        fn = SOURCES.get(kind)
    except UserError as err:
        raise UserError(f"--source {spec!r}: {err}") from None
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if options and not SOURCES.meta(kind).get("options"):
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise UserError(f"{flags}: only for videos:PATH sources, not {spec}; drop them")
    source = fn(arg, label, **options)
    source.spec = spec
    dupes = [k for k, n in Counter(item.key for item in source.items).items() if n > 1]
    if dupes:  # a bug in the source kind, not the user's input
        raise RuntimeError(f"source {spec!r} produced duplicate keys: {dupes[:5]}")
    return source


def usage() -> str:
    return ", ".join(SOURCES.meta(name).get("usage", f"{name}:ARG") for name in SOURCES.names())


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


def _only_real(spec: str, label: str | None) -> None:
    if label not in (None, "real"):
        raise UserError(f"--label {label}: source {spec} holds real faces only; drop --label")


# ----------------------------------------------------------------------------------- builtin


@SOURCES.register("builtin", usage="builtin:lfw")
def _builtin(arg: str, label: str | None) -> Source:
    return BUILTINS.get(arg)(label)


@functools.lru_cache(maxsize=1)
def _lfw_faces():
    import numpy as np

    try:
        from skimage import data
    except ImportError:  # pragma: no cover - scikit-image is a runtime dependency
        raise UserError("builtin:lfw needs scikit-image: pip install scikit-image") from None
    faces = data.lfw_subset()[:100]  # first 100 are faces, the next 100 are not
    return (faces * 255.0).round().clip(0, 255).astype(np.uint8)


def _lfw_face(index: int) -> Image.Image:
    return Image.fromarray(_lfw_faces()[index])


@BUILTINS.register("lfw")
def _lfw(label: str | None) -> Source:
    """The 100 LFW faces bundled with scikit-image (25x25 grey)."""
    _only_real("builtin:lfw", label)
    items = [
        Item(
            key=f"lfw-{i:03d}",
            split=None,
            label=LABELS["real"],
            load=functools.partial(_lfw_face, i),
            meta={"source": "lfw", "id": i, "label": "real", "dataset": "skimage.data.lfw_subset"},
            origin=f"builtin:lfw#{i}",
        )
        for i in range(len(_lfw_faces()))
    ]
    return Source("builtin:lfw", items, channels=1)


# ----------------------------------------------------------------------------------- celeba

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


@SOURCES.register("celeba", usage="celeba:PATH")
def _celeba(arg: str, label: str | None) -> Source:
    """CelebA aligned faces with the official split; attributes and bbox go into ``meta``."""
    spec = f"celeba:{arg}"
    _only_real(spec, label)
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


# ----------------------------------------------------------------------------------- folder


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


@SOURCES.register("folder", usage="folder:PATH")
def _folder(arg: str, label: str | None) -> Source:
    """``PATH/{train,val,test}/{real,fake}/*``, ``PATH/{real,fake}/*`` or a flat folder + label.

    Fakes in a subfolder of ``fake/`` (``fake/stylegan2/x.png``) record it as their generator.
    """
    spec = f"folder:{arg}"
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise UserError(f"{spec}: folder {root} does not exist")
    found = labelled_files(spec, root, label, is_image_file, f"images ({', '.join(IMAGE_EXTENSIONS)})")

    rels = [p.relative_to(root).as_posix() for p, *_ in found]
    items = []
    for (path, split, name, label_dir), rel, key in zip(found, rels, unique_keys(rels)):
        meta: dict[str, Any] = {"source": "folder", "path": rel, "label": name}
        if name == "fake":
            meta["generator"] = generator_of(path, label_dir)
        items.append(Item(key, split, LABELS[name], functools.partial(open_image, str(path)), meta, str(path)))
    return Source(spec, items, channels=1 if _all_grey(p for p, *_ in found) else None)


def _all_grey(paths) -> bool:
    """A folder of grey images stays grey (only headers are read), so colour never labels a set."""
    for path in paths:
        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "LA", "I", "I;16", "1"):
                    return False
        except OSError:  # unreadable: prepare skips and records it
            continue
    return True


from deepfake_dist.data import video as _video  # noqa: F401,E402 - registers videos:PATH (it imports this module)
