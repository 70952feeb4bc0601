"""``ffpp:PATH``: FaceForensics++ in its published layout, with its official split.

    PATH/original_sequences/youtube/{raw,c23,c40}/videos/NNN.mp4            real
    PATH/manipulated_sequences/METHOD/{raw,c23,c40}/videos/AAA_BBB.mp4      fake (target AAA, source BBB)
    PATH/{train,val,test}.json (or PATH/splits/): JSON lists of id pairs, [["953", "974"], ...]

A real video is in the split of its pair; a fake ``AAA_BBB`` in the split of the pair {AAA, BBB}
(a video whose ids are in no pair is skipped and listed). ``compression`` picks the level
(``c23`` by default); ``methods`` the manipulations (the four classic ones by default), each the
``method`` and ``generator`` of its fakes' ``json``. ``DeepFakeDetection`` (with its real videos,
``original_sequences/actors``) has no official split: it goes to test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.faces import VIDEO_OPTIONS
from deepfake_dist.data.sources.base import Source
from deepfake_dist.data.sources.video_sets import (
    Video,
    fingerprints,
    listing,
    read_json,
    require,
    split_file,
    video_options,
    video_source,
    videos_in,
)
from deepfake_dist.errors import UserError
from deepfake_dist.options import option
from deepfake_dist.registry import closest

DATASET = "FaceForensics++"
METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter", "DeepFakeDetection")
CLASSIC = METHODS[:4]
COMPRESSIONS = ("raw", "c23", "c40")


@dataclass(frozen=True)
class FfppOptions:
    """``ffpp:PATH``'s own options: ``deepfake-dist prepare``'s flags and a prepare stage's ``options``."""

    compression: str = option("c23", "ffpp: the videos' compression level", choices=COMPRESSIONS)
    methods: Optional[str] = option(None, f"ffpp: comma-separated manipulations (default {','.join(CLASSIC)}; also "
                                          "FaceShifter, DeepFakeDetection)")


OPTIONS = (*VIDEO_OPTIONS, *(f.name for f in fields(FfppOptions)))
REAL, ACTORS, FAKES = "original_sequences/youtube", "original_sequences/actors", "manipulated_sequences"
PAIRS = 'a JSON list of id pairs, e.g. [["953", "974"], ...]'


def open_ffpp(arg: str, label: str | None, compression: str = FfppOptions.compression,
              methods: str | Sequence[str] | None = FfppOptions.methods,
              **options: Any) -> Source:
    spec = f"ffpp:{arg}"
    opts = video_options(spec, label, options)
    if compression not in COMPRESSIONS:
        raise UserError(f"--compression {compression}: expected one of {', '.join(COMPRESSIONS)}")
    methods = _methods(methods)
    root = Path(arg).expanduser()
    require(spec, root, [f"{REAL}/", f"{FAKES}/"], DATASET)
    folders = {"youtube": REAL, **{m: f"{FAKES}/{m}" for m in methods}}
    if "DeepFakeDetection" in methods:
        folders["actors"] = ACTORS
    dirs = _level_dirs(spec, root, folders, compression)
    split_files = [_split_path(spec, root, split) for split in SPLITS]
    id_split, pair_split = _official_split(split_files)

    videos, skipped = [], []
    for method, folder in dirs.items():
        for path in sorted(videos_in(folder).values()):
            split = _split_of(path.stem, method, id_split, pair_split)
            if split is None:
                skipped.append({"input": str(path), "reason": "its ids are in no pair of train.json, val.json or test.json"})
                continue
            label = "real" if method in ("youtube", "actors") else "fake"
            videos.append(Video(path, split, label, method, {"compression": compression}))
    about = {"compression": compression, "methods": list(methods),
             "split_files": fingerprints(root, *split_files)}
    return video_source(spec, "ffpp", DATASET, root, videos, opts, skipped, about)


def _methods(value: str | Sequence[str] | None) -> list[str]:
    """The methods named (comma-separated or a list), in their canonical spelling, each once."""
    names = value.split(",") if isinstance(value, str) else list(value or CLASSIC)
    names = [n.strip() for n in names if n.strip()]
    canonical = {m.lower(): m for m in METHODS}
    for name in names or [""]:
        if name.lower() not in canonical:
            raise UserError(f"--methods {value}: unknown method {name!r}{closest(name, METHODS)}; "
                            f"choose from {','.join(METHODS)}")
    return list(dict.fromkeys(canonical[n.lower()] for n in names))


def _level_dirs(spec: str, root: Path, folders: dict[str, str], compression: str) -> dict[str, Path]:
    """``FOLDER/{compression}/videos`` of each folder, or one line naming the first missing one
    and what is there instead."""
    lacking = [f for f in folders.values() if not (root / f / compression / "videos").is_dir()]
    if lacking:
        first = lacking[0]
        if not (root / first).is_dir():
            present = [m for m in METHODS if (root / FAKES / m).is_dir()]
            raise UserError(f"{spec}: no {first}/ (found {listing((root / first).parent)}); "
                            f"pass --methods with the ones you have, e.g. --methods {','.join(present) or 'Deepfakes'}")
        found = sorted({p.parent.name for f in lacking for p in (root / f).glob("*/videos") if p.is_dir()})
        shown = f"{FAKES}/*" if len(lacking) > 1 and all(f.startswith(FAKES) for f in lacking) else first
        raise UserError(f"{spec}: no {shown}/{compression}/videos: found {', '.join(found) or 'no LEVEL/videos folder'}"
                        f"; pass --compression with a level you have ({', '.join(COMPRESSIONS)})")
    return {method: root / f / compression / "videos" for method, f in folders.items()}


def _split_path(spec: str, root: Path, split: str) -> Path:
    """``split.json`` in the dataset's root, or in ``splits/`` as FaceForensics' repository has it."""
    name = f"{split}.json"
    path = next((p for p in (root / name, root / "splits" / name) if p.is_file()), root / name)
    return split_file(spec, path, f"the official {split} split, {PAIRS}, from FaceForensics' dataset/splits/")


def _official_split(files: list[Path]) -> tuple[dict[str, str], dict[frozenset[str], str]]:
    """Each id's split and each pair's split, from the three files (an id in two is an error)."""
    id_split: dict[str, str] = {}
    pair_split: dict[frozenset[str], str] = {}
    for split, path in zip(SPLITS, files):
        pairs = read_json(path, PAIRS)
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(i, str) for i in p) for p in pairs):
            raise UserError(f"{path}: expected {PAIRS}")
        for pair in pairs:
            for vid in pair:
                if vid in id_split:
                    raise UserError(f"{path}: id {vid} is also in {id_split[vid]}.json; each id belongs to one split")
                id_split[vid] = split
            pair_split[frozenset(pair)] = split
    return id_split, pair_split


def _split_of(stem: str, method: str, id_split: dict[str, str], pair_split: dict[frozenset[str], str]) -> str | None:
    if method in ("DeepFakeDetection", "actors"):
        return "test"
    if method == "youtube":
        return id_split.get(stem)
    return pair_split.get(frozenset(stem.split("_")))
