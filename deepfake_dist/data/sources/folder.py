"""``folder:PATH``: images under ``PATH/{train,val,test}/{real,fake}/``, ``PATH/{real,fake}/`` or
a flat folder of one class (``--label``); a fake in a subfolder of ``fake/`` records it as its
generator."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from PIL import Image

from deepfake_dist.data.common import LABELS, Item
from deepfake_dist.data.imageio import IMAGE_EXTENSIONS, is_image_file, open_image
from deepfake_dist.data.sources.base import Source, generator_of, labelled_files, unique_keys
from deepfake_dist.errors import UserError


def open_folder(arg: str, label: str | None) -> Source:
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
