"""``fakeavceleb:PATH``: FakeAVCeleb (v1.2) in its published layout, with each clip's sound.

    PATH/meta_data.csv
    PATH/RealVideo-RealAudio/RACE/GENDER/IDENTITY/00001.mp4                   category A: real
    PATH/RealVideo-FakeAudio/RACE/GENDER/IDENTITY/00001_fake.mp4              B: cloned voice (rtvc)
    PATH/FakeVideo-RealAudio/RACE/GENDER/IDENTITY/00001_id00002_faceswap.mp4  C: face swap, reenactment
    PATH/FakeVideo-FakeAudio/RACE/GENDER/IDENTITY/00001_4_id00002_wavtolip.mp4  D: both

RACE is e.g. ``African``, ``Asian (East)``, ``Caucasian (European)``; GENDER ``men`` or ``women``;
IDENTITY the VoxCeleb2 id of the person whose video it is (``id00076``). ``meta_data.csv`` has the
header ``source,target1,target2,method,category,type,race,gender,path,`` and rows of ten values:
the eight named, then the file name and its folder (``FakeAVCeleb/<type>/<race>/<gender>/<source>``).

Each video has three labels: its video stream's, its audio stream's and the overall one (fake
when either stream is), from its category; the sample's ``cls`` is the overall label, its json
adds ``label_video``, ``label_audio``, ``category``, ``method``, ``identity``, ``target``, race and
gender, and the members ``video.cls`` and ``audio.cls`` carry the per-stream labels to the loader.

FakeAVCeleb publishes no split. Here it is by identity: the identities are shuffled (seeded) and
cut by ``identity_split`` (train, val, test fractions), and each video goes with the identity it
is filed under (``source``), so no identity is on both sides; a fake's other identity
(``target1``, whose face or voice it borrows) is recorded, and the manifest counts the fakes whose
target sits on another side. The manifest's ``preprocessing.dataset.categories`` holds the
videos per split and category. Defaults: clips of 8 frames, every 3rd (0.88 s at 25 fps), 4 a
video, each with its sound (``--audio``); every ``VideoOptions`` field can be overridden.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.shard_writer import parse_split
from deepfake_dist.data.sources.base import Source
from deepfake_dist.data.faces import VIDEO_OPTIONS, is_video_file
from deepfake_dist.data.sources.video_sets import Video, fingerprints, require, split_file, video_options, video_source
from deepfake_dist.errors import UserError
from deepfake_dist.options import option

DATASET = "FakeAVCeleb"
METADATA = "meta_data.csv"
# folder -> (letter in the CSV, video label, audio label)
CATEGORIES = {
    "RealVideo-RealAudio": ("A", "real", "real"),
    "RealVideo-FakeAudio": ("B", "real", "fake"),
    "FakeVideo-RealAudio": ("C", "fake", "real"),
    "FakeVideo-FakeAudio": ("D", "fake", "fake"),
}
COLUMNS = ("source", "target1", "target2", "method", "category", "type", "race", "gender")  # then file name, folder
DEFAULTS = {"frames": 8, "frame_step": 3, "clips_per_video": 4, "sampling": "step", "frame_level": False,
            "audio": True, "margin": 0.15}


@dataclass(frozen=True)
class FakeavcelebOptions:
    """``fakeavceleb:PATH``'s own options: ``deepfake-dist prepare``'s flags and a prepare stage's ``options``."""

    identity_split: str = option("0.7,0.15,0.15", "fakeavceleb: train,val,test fractions of the identities")


OPTIONS = (*VIDEO_OPTIONS, *(f.name for f in fields(FakeavcelebOptions)))


def open_fakeavceleb(arg: str, label: str | None, identity_split: str = FakeavcelebOptions.identity_split,
                     **options: Any) -> Source:
    spec = f"fakeavceleb:{arg}"
    opts = video_options(spec, label, options, DEFAULTS)
    try:
        fractions = parse_split(identity_split)
    except UserError as err:
        raise UserError(str(err).replace("--split", "--identity-split", 1)) from None
    root = Path(arg).expanduser()
    require(spec, root, [f"{c}/" for c in CATEGORIES], DATASET)
    rows = _metadata(split_file(spec, root / METADATA, f"the dataset's metadata, header {','.join(COLUMNS)},path,"))
    on_disk = {(c, p.relative_to(root / c).as_posix()): p for c in CATEGORIES for p in _videos_under(root / c)}
    split_of = _identity_splits({row["source"] for row in rows.values()}, fractions)

    videos, skipped = [], []
    for (category, rel), row in sorted(rows.items()):
        path = on_disk.pop((category, rel), None)
        if path is None:
            reason = f"listed in {METADATA} line {row['line']} but missing"
            skipped.append({"input": str(root / category / rel), "reason": reason})
            continue
        videos.append(_video(path, category, row, split_of[row["source"]]))
    skipped += [{"input": str(p), "reason": f"not listed in {METADATA}"} for p in on_disk.values()]
    crossing = sum(1 for v in videos if v.meta["target"] in split_of and split_of[v.meta["target"]] != v.split)
    about = {"val_share": None, "split_files": fingerprints(root, root / METADATA),
             "split_by": "identity (the person a video is filed under)", "identity_split": list(fractions),
             "identities": dict(Counter(split_of.values())),
             "fakes_with_target_in_another_split": crossing, "categories": _category_counts(videos)}
    return video_source(spec, "fakeavceleb", DATASET, root, videos, opts, skipped, about)


def _metadata(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of ``meta_data.csv`` by (category folder, path under it); a row that does not fit the
    layout is one line naming it."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    header = [c.strip().lower() for c in lines[0][1]] if lines else []
    if tuple(header[:len(COLUMNS)]) != COLUMNS:
        raise UserError(f"{path}:1: expected the header {','.join(COLUMNS)},path, got {','.join(header)!r}")
    rows = {}
    for lineno, row in lines[1:]:
        values = [c.strip() for c in row]
        if len(values) < len(COLUMNS) + 1:
            raise UserError(f"{path}:{lineno}: expected {len(COLUMNS)} values then the file name (and its folder), "
                            f"got {','.join(row)!r}")
        fields_ = dict(zip(COLUMNS, values))
        category = fields_["type"]
        if category not in CATEGORIES or CATEGORIES[category][0] != fields_["category"]:
            expected = ", ".join(f"{letter} {name}" for name, (letter, *_) in CATEGORIES.items())
            raise UserError(f"{path}:{lineno}: category {fields_['category']!r} with type {category!r}; expected one "
                            f"of {expected}")
        folder = Path(values[len(COLUMNS) + 1]) if len(values) > len(COLUMNS) + 1 and values[len(COLUMNS) + 1] else \
            Path(category, fields_["race"], fields_["gender"], fields_["source"])
        parts = folder.parts[folder.parts.index(category) + 1:] if category in folder.parts else folder.parts
        rel = Path(*parts, values[len(COLUMNS)]).as_posix()
        rows[(category, rel)] = {**fields_, "line": lineno}
    return rows


def _videos_under(folder: Path) -> list[Path]:
    """Video files below ``folder`` (hidden ones left out): many share a name (``00001.mp4``)."""
    return sorted(p for p in folder.rglob("*") if is_video_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _identity_splits(identities: set[str], fractions: tuple[float, float, float]) -> dict[str, str]:
    """Each identity's split: a seeded shuffle of the sorted ids cut by ``fractions`` (a split
    with a non-zero fraction gets at least one identity when there are enough)."""
    ordered = sorted(identities)
    random.Random("fakeavceleb:identities").shuffle(ordered)
    n = len(ordered)
    sizes = [round(n * f) for f in fractions]
    for i in (1, 2):  # val and test get one identity each before train gives them up
        if fractions[i] > 0 and sizes[i] == 0 and n >= 3:
            sizes[i], sizes[0] = 1, sizes[0] - 1
    cut1, cut2 = sizes[0], min(n, sizes[0] + sizes[1])
    return {ident: SPLITS[0 if k < cut1 else 1 if k < cut2 else 2] for k, ident in enumerate(ordered)}


def _video(path: Path, category: str, row: dict[str, Any], split: str) -> Video:
    letter, video_label, audio_label = CATEGORIES[category]
    fake = "fake" in (video_label, audio_label)
    target = row["target1"] if row["target1"] not in ("", "-") else None
    meta = {"category": category, "category_letter": letter, "label_video": video_label, "label_audio": audio_label,
            "identity": row["source"], "target": target, "race": row["race"], "gender": row["gender"],
            "csv_method": row["method"]}
    members = {"video.cls": str(int(video_label == "fake")).encode(), "audio.cls": str(int(audio_label == "fake")).encode()}
    method = category if not fake else f"{category}/{row['method']}"
    return Video(path, split, "fake" if fake else "real", method, meta, members,
                 name=f"{category}/{row['source']}/{path.name}")


def _category_counts(videos: list[Video]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for video in videos:
        counts[video.split][video.meta["category"]] += 1
    return {split: {c: counts[split][c] for c in CATEGORIES} for split in SPLITS}
