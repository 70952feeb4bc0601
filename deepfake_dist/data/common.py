"""The names every data module shares, kept apart so that none of them imports another for them:
the splits, labels and member names of a shard set, the records a source hands to the shard
writer (``Item``, ``Sample``, ``Expanded``), and what a loader reports of data it could not read
(``ReadProblem``, ``DataUnavailable``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from deepfake_dist.errors import UserError

SPLITS = ("train", "val", "test")
LABELS = {"real": 0, "fake": 1}
LABEL_NAMES = ("real", "fake")  # index = the sample's ``cls``
# Folder names accepted for a fixed split (lower-cased before lookup).
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")  # a sample's image member, the first found
FRAME_KEY = re.compile(r"^f\d{3}\.(jpg|png|jpeg|webp)$")  # a clip's frames: f000.png, f001.png, ...


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
    members: extra tar members every sample of this input carries, e.g. ``{"video.cls": b"1"}``
           (a per-stream label the loader reads without parsing the json).
    """

    key: str
    split: str | None
    label: int
    load: Callable[[], Image.Image] = field(repr=False, compare=False)
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    members: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass
class Sample:
    """One of the samples an input yields: its key is the item's key + ``suffix``; ``image`` is
    one image or a list (a clip, stored as members ``f000.<fmt>``, ``f001.<fmt>``, ... in order);
    ``meta`` is merged over the item's meta in the sample's ``json``; ``members`` are extra encoded
    tar members of this sample alone (a clip's sound: ``{"wav": ...}``)."""

    suffix: str
    image: Image.Image | list[Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)
    members: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass
class Expanded:
    """What ``Item.load`` returns for an input with several samples, and the parts of it that
    yielded none (``{"part", "reason"}``; the manifest lists them under ``skipped``)."""

    samples: list[Sample]
    dropped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ReadProblem:
    """Data a loader could not read: one sample (``sample=True``; the rest of its shard was read)
    or the rest of a shard (``key``: the last sample read before it broke, None if none was)."""

    shard: str
    key: str | None
    reason: str
    sample: bool

    def __str__(self) -> str:
        if self.sample:
            return f"shard {self.shard}: sample {self.key} is unreadable ({self.reason})"
        where = f"after sample {self.key}" if self.key else "from its start"
        return f"shard {self.shard} is unreadable {where} ({self.reason})"


class DataUnavailable(UserError):
    """A training loader that can read no more of its shards (every one unreadable, or too many
    in a row): the run stops, with a checkpoint, rather than wait for data that does not come."""
