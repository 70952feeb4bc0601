"""``deepfake-dist shards index``: a manifest for WebDataset shards made elsewhere (a stock
``webdataset.ShardWriter``, ``tarp``), so they train and evaluate as they are.

Every ``.tar`` in the location is read once, streamed (a folder or ``s3://bucket/prefix``; an
HTTP location can be neither listed nor written): its size and sha256, its samples' labels (by
the rule the options give, ``labels.LabelRule``, recorded in the manifest for the loaders), the
format, size and mode of each image (from its header; nothing is decoded). Samples with no image
or no label are listed under ``unusable`` (the loaders skip them, counted as skipped samples);
when no sample of the first shard has a label, the rule is wrong for the set and the error lists
the members and json fields its samples do have. A shard's split is ``train`` unless
``--split-from-name`` takes it from a word in its file name (train, val, valid, validation, test).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from deepfake_dist.data import locations
from deepfake_dist.data.common import IMAGE_KEYS, LABEL_NAMES, SPLIT_DIRS, SPLITS
from deepfake_dist.data.labels import LabelRule
from deepfake_dist.data.manifest import FORMAT_VERSION, MANIFEST_NAME, HashingStream, load_manifest, manifest_id
from deepfake_dist.data.shard_writer import created_info
from deepfake_dist.data.tarstream import tar_samples
from deepfake_dist.errors import UserError

_SPLIT_WORD = re.compile(r"(?<![a-z])(train|validation|valid|val|test)(?![a-z])", re.IGNORECASE)
_GREY = ("1", "L", "LA", "I", "I;16", "F")


class _Found:
    """What the samples read so far hold: labels, image formats, sizes and modes, unusable ones."""

    def __init__(self):
        self.formats, self.sizes, self.modes = Counter(), Counter(), Counter()
        self.members, self.fields = Counter(), Counter()
        self.unusable: list[dict[str, str]] = []

    def sample(self, shard: str, sample: dict, rule: LabelRule) -> str | None:
        """The sample's label name, or None (it is then listed as unusable)."""
        self.members.update(k for k in sample if not k.startswith("__"))
        if "json" in sample:
            try:
                self.fields.update(json.loads(sample["json"]))
            except (ValueError, TypeError):
                pass
        image = next((k for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            return self._unusable(shard, sample, "no image (jpg, png, jpeg or webp member)")
        try:
            with Image.open(io.BytesIO(sample[image])) as img:  # the header only
                self.formats[image] += 1
                self.sizes[f"{img.width}x{img.height}"] += 1
                self.modes[img.mode] += 1
        except (OSError, ValueError) as err:
            return self._unusable(shard, sample, f"its {image} is not an image ({err})")
        try:
            return LABEL_NAMES[rule.label(sample)]
        except ValueError as err:
            return self._unusable(shard, sample, f"no label: {err}")

    def _unusable(self, shard: str, sample: dict, reason: str) -> str | None:
        self.unusable.append({"shard": shard, "key": sample["__key__"], "reason": reason})
        return None


def shard_split(name: str, from_name: bool) -> str:
    if not from_name:
        return "train"
    match = _SPLIT_WORD.search(name)
    if match is None:
        raise UserError(f"--split-from-name: {name} names no split (train, val, valid, validation or test); "
                        "rename it or index without --split-from-name (every shard is then train)")
    return SPLIT_DIRS[match[1].lower()]


def index_set(location: str, label_key: str | None = None, label_from_path: str | None = None,
              split_from_name: bool = False, command: str | None = None) -> dict[str, Any]:
    """Write ``location``'s ``manifest.json`` (see the module docstring) and return it."""
    rule = LabelRule.from_options(label_key, label_from_path)
    location = str(location).rstrip("/") if locations.is_remote(location) else str(location)
    locations.check_writable(location)
    names = [n for n in locations.list_names(location) if n.endswith(".tar")]
    if not names:
        raise UserError(f"{location}: no .tar shards there to index")
    if MANIFEST_NAME in locations.list_names(location) and "indexed" not in load_manifest(location):
        raise UserError(f"{location} already has a {MANIFEST_NAME} written by prepare or generate; shards index is "
                        "for shards made elsewhere")
    found, shards = _Found(), []
    for name in sorted(names, key=lambda n: (SPLITS.index(shard_split(n, split_from_name)), n)):
        shard = _index_shard(location, name, shard_split(name, split_from_name), rule, found)
        if not shards and shard["samples"] and not shard["real"] + shard["fake"]:
            raise UserError(_no_label_message(location, name, rule, found))
        shards.append(shard)
    manifest = _manifest(location, shards, rule, found, split_from_name, command)
    locations.write_bytes(locations.join(location, MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _index_shard(location: str, name: str, split: str, rule: LabelRule, found: _Found) -> dict[str, Any]:
    labels: Counter = Counter()
    url = locations.join(location, name)
    try:
        with locations.open_stream(url) as raw:
            stream = HashingStream(raw)
            for sample in tar_samples(stream):
                labels["samples"] += 1
                label = found.sample(name, sample, rule)
                if label is not None:
                    labels[label] += 1
            digest = stream.drain()
    except (OSError, ValueError, tarfile.TarError) as err:
        raise UserError(f"{url}: not a readable tar ({err}); index a set whose shards all read") from None
    return {"split": split, "file": name, "samples": labels["samples"], **{k: labels[k] for k in LABEL_NAMES},
            "bytes": raw.size, "sha256": digest}


def _no_label_message(location: str, name: str, rule: LabelRule, found: _Found) -> str:
    fields = f" (its json fields: {', '.join(sorted(found.fields))})" if found.fields else ""
    return (f"{location}: no sample of {name} has a label by {rule.describe()}; its samples hold the members "
            f"{', '.join(sorted(found.members))}{fields}; give --label-key MEMBER, --label-key json:FIELD or "
            "--label-from-path PATTERN")


def _manifest(location: str, shards: list[dict[str, Any]], rule: LabelRule, found: _Found, split_from_name: bool,
              command: str | None) -> dict[str, Any]:
    counts = {split: {label: 0 for label in (*LABEL_NAMES, "total")} for split in SPLITS}
    for shard in shards:
        for label in LABEL_NAMES:
            counts[shard["split"]][label] += shard[label]
        counts[shard["split"]]["total"] += shard["samples"]
    fmt, mode = found.formats.most_common(1)[0][0], found.modes.most_common(1)[0][0]
    width, height = map(int, found.sizes.most_common(1)[0][0].split("x"))
    return {
        "format_version": FORMAT_VERSION, "id": manifest_id(shards),
        "name": locations.set_name(location if locations.is_remote(location) else Path(location).resolve()),
        "source": f"index:{location}", "resolution": max(width, height), "format": fmt,
        "channels": 1 if all(m in _GREY for m in found.modes) else 3, "mode": mode, "frames": None,
        "labels": rule.to_manifest(), "preprocessing": {"note": "made elsewhere: unknown"},
        "split": {"from_file_names": split_from_name},
        "indexed": {"image_formats": dict(found.formats), "image_sizes": dict(found.sizes.most_common(20)),
                    "image_modes": dict(found.modes), "unusable": len(found.unusable)},
        "created": created_info(command or f"deepfake-dist shards index {location}", 1, 1),
        "counts": counts, "shards": shards, "unusable": found.unusable,
    }
