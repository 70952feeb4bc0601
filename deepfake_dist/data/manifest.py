"""A shard set on disk: ``manifest.json`` plus ``{split}-NNNNNN.tar`` files.

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

from deepfake_dist.data.common import LABEL_NAMES, SPLITS
from deepfake_dist.data.tarstream import tar_members
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


def _set_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == MANIFEST_NAME and path.is_file() else path


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``PATH/manifest.json`` (``PATH`` may also be the manifest file itself)."""
    set_dir = _set_dir(path)
    file = set_dir / MANIFEST_NAME
    hint = f"run deepfake-dist prepare --source SOURCE --out {set_dir} first"
    if not set_dir.is_dir():
        raise UserError(f"shard set {set_dir} does not exist; {hint}")
    if not file.is_file():
        raise UserError(f"{set_dir} has no {MANIFEST_NAME} (not a finished shard set); {hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is unreadable ({err}); "
                        f"re-create it: deepfake-dist prepare ... --out {set_dir} --overwrite") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}; re-create it: deepfake-dist prepare ... --out {set_dir} --overwrite")
    if manifest["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{file} has format_version {manifest['format_version']}, newer than this deepfake_dist "
            f"reads ({FORMAT_VERSION}); upgrade deepfake_dist"
        )
    return manifest


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def listed_shards(set_dir: str | Path, split: str) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, manifest entry)`` of each of ``split``'s shards in manifest order, whether or not
    the file is there (the training loader may go on without a missing one)."""
    _check_split(split)
    set_dir = _set_dir(set_dir)
    return [(set_dir / s["file"], s) for s in load_manifest(set_dir)["shards"] if s["split"] == split]


def missing_shard_error(path: Path) -> UserError:
    set_dir = path.parent
    return UserError(
        f"{path} is listed in {set_dir / MANIFEST_NAME} but missing; run deepfake-dist "
        f"shards verify {set_dir}, or re-create the set with deepfake-dist prepare ... --overwrite"
    )


def shard_urls(set_dir: str | Path, split: str) -> list[str]:
    """Paths of ``split``'s shards in manifest order ([] when the set has none for that split);
    a listed shard that is missing is an error."""
    urls = []
    for path, _ in listed_shards(set_dir, split):
        if not path.is_file():
            raise missing_shard_error(path)
        urls.append(str(path))
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


def _read_shard(path: Path, images: list[str]) -> tuple[Counter, list[str]]:
    """Label counts of a shard's samples by reading the tar, and problems with its samples."""
    members: dict[str, dict[str, bytes | None]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, dot, ext = base.partition(".")
            if not dot:
                continue
            entry = members.setdefault(key, {})
            entry[ext] = tar.extractfile(info).read() if ext == "cls" else None
    labels: Counter = Counter()
    problems = []
    for key, entry in members.items():
        cls = entry.get("cls")
        if cls not in (b"0", b"1"):
            problems.append(f"sample {key} has cls {cls!r}, expected b'0' or b'1'")
        else:
            labels[LABEL_NAMES[int(cls)]] += 1
        missing = [ext for ext in (*images, "json") if ext not in entry]
        if missing:
            problems.append(f"sample {key} lacks {' and '.join(missing)}")
    labels["total"] = len(members)
    return labels, problems


def verify(set_dir: str | Path) -> list[str]:
    """Re-read every shard and compare it with the manifest; returns one line per problem
    (``[]`` when the set is intact). Each line starts with the shard file it is about."""
    set_dir = _set_dir(set_dir)
    manifest = load_manifest(set_dir)
    problems: list[str] = []
    listed = set()
    totals: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for shard in manifest["shards"]:
        name = shard["file"]
        listed.add(name)
        path = set_dir / name
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest but missing from {set_dir}")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{name}: {size} bytes on disk, manifest says {shard['bytes']}")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            problems.append(f"{name}: sha256 {digest[:12]}... differs from the manifest's {shard['sha256'][:12]}...")
        try:
            for _ in tar_members(path):  # the loader's reader first: tarfile loops on or misreads some damaged headers
                pass
            labels, sample_problems = _read_shard(path, image_members(manifest))
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            problems.append(f"{name}: not a readable tar ({err})")
            continue
        problems += [f"{name}: {p}" for p in sample_problems]
        if labels["total"] != shard["samples"]:
            problems.append(f"{name}: {labels['total']} samples in the tar, manifest says {shard['samples']}")
        for label in LABEL_NAMES:
            if label in shard and labels[label] != shard[label]:
                problems.append(f"{name}: {labels[label]} {label} samples in the tar, manifest says {shard[label]}")
        totals[shard["split"]].update(labels)
    for split in SPLITS:
        expected = manifest["counts"].get(split, {})
        for label in (*LABEL_NAMES, "total"):
            if totals[split][label] != expected.get(label, 0):
                problems.append(
                    f"manifest counts: {split} {label} is {expected.get(label, 0)} but its shards hold {totals[split][label]}"
                )
    for path in sorted(set_dir.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: on disk but not listed in the manifest")
    if manifest_id(manifest["shards"]) != manifest["id"]:
        problems.append(f"manifest id {manifest['id']} does not match its shard list")
    return problems


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
