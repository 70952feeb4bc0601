"""The ``deepfake-dist prepare`` back end: a face source -> a shard set, ``prepare(source, out, ...)``.

It checks the arguments, opens the source (``data.sources``), plans its inputs into shards and
writes them with ``data.shard_writer`` (which describes the layout, its determinism and how
ranks and workers share the work), recording in the manifest every setting that made the set.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfake_dist.data import imageio
from deepfake_dist.data.shard_writer import Encoding, ShardSetWriter, created_info, parse_split, plan_shards
from deepfake_dist.data.sources import open_source
from deepfake_dist.data.sources.base import Source
from deepfake_dist.engine.distributed import distributed_state
from deepfake_dist.errors import UserError


def prepare(
    source: str,
    out: str | Path,
    resolution: int = 64,
    fmt: str = "png",
    shard_size: int = 1000,
    split: Sequence[float] | str = (0.8, 0.1, 0.1),
    workers: int = 1,
    label: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    quality: int = 95,
    command: str | None = None,
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Shard ``source`` (``builtin:lfw``, ``celeba:PATH``, ``folder:PATH``, ``videos:PATH``) into ``out``
    (a folder or ``s3://bucket/prefix``).

    Call it on every rank (under ``accelerate launch`` each rank writes its part); every rank
    returns the manifest. ``label`` ("real"/"fake") is for a flat folder; ``split`` fractions
    apply to items whose split the source does not fix; ``command`` is recorded in the manifest
    (default: the equivalent ``deepfake-dist prepare`` command); ``progress`` shows a rich bar
    on the main process; ``options`` are the source kind's own (``videos``: ``data.faces.VideoOptions``
    fields, None values ignored). Raises ``UserError`` for bad arguments, a bad source or a
    non-empty ``out`` without ``overwrite`` -- before any file is written.
    """
    fmt = _check_args(fmt, resolution, shard_size, workers, quality)
    fractions = parse_split(split)
    state = distributed_state()
    writer = ShardSetWriter(out, overwrite, state, workers)
    src = open_source(source, label, options)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    encoding = Encoding("L" if src.channels == 1 else "RGB", resolution, fmt, quality)
    writer.write(writer.jobs(plan_shards(src.items, fractions, seed, shard_size), encoding), progress)
    fields = None
    if state.is_main_process:
        command = command or _default_command(source=source, out=out, resolution=resolution, fmt=fmt,
                                              shard_size=shard_size, split=fractions, workers=workers, seed=seed,
                                              quality=quality, label=label, options=options)
        fields = _manifest_fields(src, writer.name, encoding, fractions, seed, shard_size, label,
                                  created_info(command, workers, state.num_processes))
    return writer.finish(fields, src.skipped, len(src.items) + len(src.skipped))


def _check_args(fmt: str, resolution: int, shard_size: int, workers: int, quality: int) -> str:
    """The shard image format, normalised (``jpeg`` -> ``jpg``); a bad argument is a UserError."""
    fmt = {"jpeg": "jpg"}.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in imageio.FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(imageio.FORMATS)}")
    for name, value, low in (("--resolution", resolution, 8), ("--shard-size", shard_size, 1), ("--workers", workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{name} {value}: expected an integer >= {low}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: expected an integer from 1 to 100")
    return fmt


def _manifest_fields(src: Source, name: str, encoding: Encoding, fractions: Sequence[float], seed: int,
                     shard_size: int, label: str | None, created: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about a prepared set: every setting that made it."""
    jpg = encoding.fmt == "jpg"
    return {
        "name": name,
        "source": src.spec,
        "resolution": encoding.resolution,
        "format": encoding.fmt,
        "channels": 1 if encoding.mode == "L" else 3,
        "mode": encoding.mode,
        "frames": src.frames,  # images per sample (a clip's f000.., f001..); None: one image
        "preprocessing": {
            "exif_transpose": True, "crop": "center", "resize_filter": imageio.RESIZE_FILTER,
            "jpeg_quality": encoding.quality if jpg else None,
            "jpeg_subsampling": imageio.JPEG_SUBSAMPLING if jpg else None,
            **src.preprocessing,
        },
        "split": {"fractions": list(fractions), "seed": seed,
                  "assigned_by_fractions": sum(1 for item in src.items if item.split is None)},
        "shard_size": shard_size,
        "label": label,
        "created": created,
    }


def _default_command(**args: Any) -> str:
    """The CLI command that makes this set, when the caller did not pass its own."""
    parts = ["deepfake-dist", "prepare", "--source", args["source"], "--out", str(args["out"]),
             "--resolution", str(args["resolution"]), "--format", args["fmt"],
             "--shard-size", str(args["shard_size"]), "--split", ",".join(f"{v:g}" for v in args["split"]),
             "--workers", str(args["workers"]), "--seed", str(args["seed"])]
    if args["fmt"] == "jpg":
        parts += ["--quality", str(args["quality"])]
    if args["label"]:
        parts += ["--label", args["label"]]
    for name, value in args["options"].items():  # the source kind's options, as CLI flags
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True else [] if value is False else [flag, str(value)]
    return shlex.join(parts)
