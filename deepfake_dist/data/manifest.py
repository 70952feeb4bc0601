"""A shard set: ``manifest.json`` plus its tar shards, at any location (a folder, an HTTP(S)
URL, an S3 prefix: see ``locations``).

``load_manifest`` / ``shard_urls`` / ``split_count`` are what the loader and the trainer use;
``verify`` and ``info_table`` back ``deepfake-dist shards verify`` and ``shards info``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from deepfake_dist.data import locations
from deepfake_dist.data.common import IMAGE_KEYS, LABEL_NAMES, SPLITS
from deepfake_dist.data.labels import LabelRule
from deepfake_dist.data.tarstream import tar_samples
from deepfake_dist.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_REQUIRED = ("format_version", "source", "resolution", "format", "counts", "shards", "id")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_id(shards: list[dict[str, Any]]) -> str:
    """A short content id: sha256 over each shard's split, name and sha256, in manifest order."""
    text = "\n".join(f"{s['split']}/{s['file']}:{s['sha256']}" for s in shards)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_location(path: str | Path) -> str:
    """The set a path or URL names: itself, or the set of the ``manifest.json`` it names."""
    parent, name = locations.split(path)
    if name == MANIFEST_NAME and (locations.is_remote(path) or Path(path).is_file()):
        return parent
    return str(path).rstrip("/") if locations.is_remote(path) else str(path)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``PATH/manifest.json`` (``PATH`` may also be the manifest file itself)."""
    location = set_location(path)
    file = locations.join(location, MANIFEST_NAME)
    hint = (f"run deepfake-dist prepare --source SOURCE --out {location} first (or deepfake-dist shards index "
            f"{location} for shards made elsewhere)")
    if not locations.is_remote(location) and not Path(location).is_dir():
        raise UserError(f"shard set {location} does not exist; {hint}")
    try:
        manifest = json.loads(locations.read_bytes(file))
    except FileNotFoundError:
        raise UserError(f"{location} has no {MANIFEST_NAME} (not a finished shard set); {hint}") from None
    except PermissionError as err:
        raise UserError(f"{err}; check the credentials for {location}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is unreadable ({err}); "
                        f"re-create it: deepfake-dist prepare ... --out {location} --overwrite") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}; re-create it: deepfake-dist prepare ... --out {location} "
                        "--overwrite")
    if manifest["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{file} has format_version {manifest['format_version']}, newer than this deepfake_dist "
            f"reads ({FORMAT_VERSION}); upgrade deepfake_dist"
        )
    return manifest


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def listed_shards(set_path: str | Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """``(url, manifest entry)`` of each of ``split``'s shards in manifest order, whether or not
    the file is there (the training loader may go on without a missing one)."""
    _check_split(split)
    location = set_location(set_path)
    return [(locations.join(location, s["file"]), s) for s in load_manifest(location)["shards"] if s["split"] == split]


def missing_locally(urls: list[str]) -> list[str]:
    """The local files of ``urls`` that are not there. Remote shards are not checked up front
    (a request each): one that is gone is found when it is read, as a shard deleted mid-run is."""
    return [url for url in urls if not locations.is_remote(url) and not Path(url).is_file()]


def missing_shard_error(url: str) -> UserError:
    location = locations.split(url)[0]
    return UserError(
        f"{url} is listed in {locations.join(location, MANIFEST_NAME)} but missing; run deepfake-dist "
        f"shards verify {location}, or re-create the set with deepfake-dist prepare ... --overwrite"
    )


def shard_urls(set_path: str | Path, split: str) -> list[str]:
    """URLs of ``split``'s shards in manifest order ([] when the set has none for that split);
    a listed local shard that is missing is an error."""
    urls = [url for url, _ in listed_shards(set_path, split)]
    missing = missing_locally(urls)
    if missing:
        raise missing_shard_error(missing[0])
    return urls


def split_count(manifest: dict[str, Any], split: str, label: str | None = None) -> int:
    """Samples in ``split`` (of one label, "real"/"fake", when given); 0 when the split is empty."""
    _check_split(split)
    counts = manifest["counts"].get(split, {})
    return int(counts.get(label or "total", 0))


def image_members(manifest: dict[str, Any]) -> list[str]:
    """A sample's image members: ``png`` / ``jpg``, or a clip's ``f000.png``, ``f001.png``, ..."""
    frames, fmt = manifest.get("frames"), manifest["format"]
    return [f"f{i:03d}.{fmt}" for i in range(frames)] if frames else [fmt]


class HashingStream:
    """A stream (``locations.open_stream``) whose every byte, read or skipped, goes into a sha256:
    a shard checked in one pass."""

    def __init__(self, stream):
        self.stream, self.url, self.size = stream, stream.url, stream.size
        self.digest = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def skip(self, n: int) -> None:
        while n > 0 and (data := self.read(min(n, 1 << 20))):
            n -= len(data)

    def drain(self) -> str:
        """Read to the end; the file's sha256."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _sample_problem(sample: dict, manifest: dict[str, Any], rule: LabelRule) -> tuple[int | None, str | None]:
    """A sample's label, and what is wrong with it (None: nothing)."""
    key = sample["__key__"]
    try:
        label = rule.label(sample)
    except ValueError as err:
        return None, f"sample {key}: {err}"
    if "indexed" in manifest:  # shards made elsewhere: any image member
        missing = [] if any(k in sample for k in IMAGE_KEYS) else ["an image"]
    else:
        missing = [ext for ext in (*image_members(manifest), "json") if ext not in sample]
    return label, f"sample {key} lacks {' and '.join(missing)}" if missing else None


def _read_shard(stream: HashingStream, manifest: dict[str, Any], rule: LabelRule,
                known: set[str]) -> tuple[Counter, list[str]]:
    """Label counts of a shard's samples by reading the tar, and problems with its samples
    (not those in ``known``: the unusable samples an index listed). Only label members are kept."""
    labels: Counter = Counter()
    problems = []
    for sample in tar_samples(stream, want=rule.reads):
        labels["total"] += 1
        if sample["__key__"] in known:
            continue
        label, problem = _sample_problem(sample, manifest, rule)
        if problem:
            problems.append(problem)
        if label is not None:
            labels[LABEL_NAMES[label]] += 1
    return labels, problems


def verify(set_path: str | Path) -> list[str]:
    """Re-read every shard and compare it with the manifest; returns one line per problem
    (``[]`` when the set is intact). Each line starts with the shard file it is about. Each shard
    is read once (its sha256, size and samples together), streamed from wherever it lives."""
    location = set_location(set_path)
    manifest = load_manifest(location)
    rule = LabelRule.from_manifest(manifest)
    problems: list[str] = []
    totals: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for shard in manifest["shards"]:
        name = shard["file"]
        known = {u["key"] for u in manifest.get("unusable", []) if u["shard"] == name}
        try:
            found = _check_shard(locations.join(location, name), shard, manifest, rule, known)
        except FileNotFoundError:
            problems.append(f"{name}: listed in the manifest but missing from {location}")
            continue
        except OSError as err:
            problems.append(f"{name}: unreadable ({err})")
            continue
        problems += [f"{name}: {p}" for p in found[1]]
        totals[shard["split"]].update(found[0])
    for split in SPLITS:
        expected = manifest["counts"].get(split, {})
        for label in (*LABEL_NAMES, "total"):
            if totals[split][label] != expected.get(label, 0):
                problems.append(
                    f"manifest counts: {split} {label} is {expected.get(label, 0)} but its shards hold {totals[split][label]}"
                )
    if not locations.is_remote(location) or location.startswith("s3://"):  # an HTTP location cannot be listed
        listed = {shard["file"] for shard in manifest["shards"]}
        for name in locations.list_names(location):
            if name.endswith(".tar") and name not in listed:
                problems.append(f"{name}: on disk but not listed in the manifest")
    if manifest_id(manifest["shards"]) != manifest["id"]:
        problems.append(f"manifest id {manifest['id']} does not match its shard list")
    return problems


def _check_shard(url: str, shard: dict[str, Any], manifest: dict[str, Any], rule: LabelRule,
                 known: set[str]) -> tuple[Counter, list[str]]:
    """One shard against its manifest entry: (its label counts, its problems)."""
    with locations.open_stream(url) as raw:
        stream = HashingStream(raw)
        try:
            labels, sample_problems = _read_shard(stream, manifest, rule, known)
            broken = None
        except (tarfile.TarError, ValueError) as err:
            labels, sample_problems, broken = Counter(), [], err
        digest = stream.drain()
    problems = []
    if stream.size != shard["bytes"]:
        problems.append(f"{stream.size} bytes on disk, manifest says {shard['bytes']}")
    if digest != shard["sha256"]:
        problems.append(f"sha256 {digest[:12]}... differs from the manifest's {shard['sha256'][:12]}...")
    if broken is not None:
        return labels, [*problems, f"not a readable tar ({broken})"]
    problems += sample_problems
    if labels["total"] != shard["samples"]:
        problems.append(f"{labels['total']} samples in the tar, manifest says {shard['samples']}")
    for label in LABEL_NAMES:
        if label in shard and labels[label] != shard[label]:
            problems.append(f"{labels[label]} {label} samples in the tar, manifest says {shard[label]}")
    return labels, problems


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def info_table(manifest: dict[str, Any]):
    """A rich Table for ``shards info``: samples per split and label with shards and bytes, and
    below it the set's source, preprocessing, skipped inputs, provenance and id."""
    from rich.table import Table

    counts = Table(show_edge=True)
    counts.add_column("split")
    for label in (*LABEL_NAMES, "total"):
        counts.add_column(label, justify="right")
    counts.add_column("shards", justify="right")
    counts.add_column("bytes", justify="right")
    sums: Counter = Counter()
    for split in SPLITS:
        row = manifest["counts"].get(split, {})
        shards = [s for s in manifest["shards"] if s["split"] == split]
        size = sum(s["bytes"] for s in shards)
        values = [row.get(label, 0) for label in (*LABEL_NAMES, "total")]
        sums.update({**dict(zip((*LABEL_NAMES, "total"), values)), "shards": len(shards), "bytes": size})
        counts.add_row(split, *map(str, values), str(len(shards)), _human_bytes(size))
    counts.add_section()
    counts.add_row("all", *(str(sums[k]) for k in (*LABEL_NAMES, "total", "shards")), _human_bytes(sums["bytes"]), style="bold")

    pre = manifest.get("preprocessing", {})
    image = f"{manifest['resolution']}x{manifest['resolution']} {manifest.get('mode', '?')} {manifest['format']}"
    if manifest.get("frames"):
        image = f"clips of {manifest['frames']} frames, {image}"
    if manifest["format"] == "jpg" and pre.get("jpeg_quality") is not None:
        image += f" (quality {pre['jpeg_quality']}, {pre.get('jpeg_subsampling', '?')})"
    created = manifest.get("created", {})
    skipped = manifest.get("skipped", [])
    settings = Table.grid(padding=(0, 2))
    settings.add_column(style="bold")
    settings.add_column()
    for key, value in (
        ("id", manifest["id"]),
        ("source", manifest["source"]),
        ("images", image),
        ("preprocessing", f"crop {pre.get('crop', '?')}, resize {pre.get('resize_filter', '?')}"),
        ("split", ", ".join(f"{k} {v}" for k, v in manifest.get("split", {}).items())),
        ("skipped", f"{len(skipped)}" + (f" (first: {skipped[0]['input']}: {skipped[0]['reason']})" if skipped else "")),
        ("created", (f"{created.get('time', '?')}, deepfake_dist {created.get('package_version', '?')}, "
                     f"{created.get('world_size', '?')} rank(s) x {created.get('workers', '?')} worker(s)")),
        ("command", created.get("command") or "?"),
    ):
        settings.add_row(key, str(value))
    if "indexed" in manifest:  # shards made elsewhere: how labels are read, what could not be used
        unusable = manifest.get("unusable", [])
        settings.add_row("labels", LabelRule.from_manifest(manifest).describe())
        settings.add_row("unusable", f"{len(unusable)}" + (f" (first: {unusable[0]['shard']}: {unusable[0]['key']}: "
                                                           f"{unusable[0]['reason']})" if unusable else ""))
    video = pre.get("video")
    if video:
        sampling = f"every {video['frame_step']}" if video["sampling"] == "step" else "uniform"
        settings.add_row("video", (
            f"{'one sample per frame' if video['frame_level'] else str(video['frames']) + ' frames per clip'}, "
            f"up to {video['clips_per_video']} clips per video ({sampling}), face crop margin {video['margin']} "
            f"({video['face_detector']['kind']} detector)"))

    table = Table.grid(padding=(1, 0))
    table.title = f"shard set {manifest.get('name', '')}"
    table.add_row(counts)
    table.add_row(settings)
    return table
