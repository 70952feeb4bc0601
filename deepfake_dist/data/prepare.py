"""The ``deepfake-dist prepare`` back end: a face source -> a shard set, ``prepare(PrepareOptions(...))``.

It checks the arguments, opens the source (``data.sources``), plans its inputs into shards and
writes them with ``data.shard_writer`` (which describes the layout, its determinism and how
ranks and workers share the work), recording in the manifest every setting that made the set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from deepfake_dist.data import imageio
from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.shard_writer import Encoding, ShardSetWriter, created_info, parse_split, plan_shards
from deepfake_dist.data.sources import open_source
from deepfake_dist.data.sources.base import Source
from deepfake_dist.engine.distributed import distributed_state
from deepfake_dist.errors import UserError
from deepfake_dist.options import PrepareOptions, command_line

RESOLUTION, SHARD_SIZE = 64, 1000  # when neither the caller nor the source kind gives one


def prepare(opts: PrepareOptions, *, command: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Shard ``opts.source`` (``builtin:lfw``, ``celeba:PATH``, ``folder:PATH``, ``videos:PATH``)
    into ``opts.out`` (a folder or ``s3://bucket/prefix``).

    Call it on every rank (under ``accelerate launch`` each rank writes its part); every rank
    returns the manifest. ``label`` ("real"/"fake") is for a flat folder; ``split`` fractions
    apply to items whose split the source does not fix; ``options`` are the source kind's own
    (``videos``: ``data.faces.VideoOptions`` fields, None values ignored). ``command`` is recorded
    in the manifest (default: the equivalent ``deepfake-dist prepare`` command); ``progress`` shows
    a rich bar on the main process. ``resolution`` and ``shard_size`` (inputs a shard) left
    ``None`` take the source kind's standard (256 px and 32 videos for the benchmark datasets),
    else 64 and 1000. Raises ``UserError`` for bad arguments, a bad source or a
    non-empty ``out`` without ``overwrite`` -- before any file is written.
    """
    fmt = _check_args(opts.format, opts.resolution, opts.shard_size, opts.workers, opts.quality)
    fractions, kept = parse_split(opts.split), parse_splits(opts.splits)
    state = distributed_state()
    writer = ShardSetWriter(opts.out, opts.overwrite, state, opts.workers)
    src = open_source(opts.source, opts.label, opts.options)
    given, opts = opts, replace(opts, resolution=opts.resolution or src.resolution or RESOLUTION,
                                shard_size=opts.shard_size or src.shard_size or SHARD_SIZE)
    encoding = Encoding("L" if src.channels == 1 else "RGB", opts.resolution, fmt, opts.quality)
    plans = [p for p in plan_shards(src.items, fractions, opts.seed, opts.shard_size) if p.split in kept]
    if not plans:
        raise UserError(f"--splits {','.join(kept)}: {opts.source} has no input in {', '.join(kept)}")
    writer.write(writer.jobs(plans, encoding), progress)
    fields = None
    if state.is_main_process:  # the manifest records the command that makes this set again
        created = created_info(command or recorded_command(given), opts.workers, state.num_processes)
        fields = _manifest_fields(src, writer.name, encoding, fractions, opts, created)
    return writer.finish(fields, src.skipped, len(src.items) + len(src.skipped))


def parse_splits(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The splits to write: ``"test"``, ``"val,test"`` or a list; ``None``: all of them."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value or SPLITS)]
    if not names or any(n not in SPLITS for n in names):
        raise UserError(f"--splits {','.join(names)}: expected some of {','.join(SPLITS)}, comma-separated")
    return tuple(n for n in SPLITS if n in names)


def recorded_command(opts: PrepareOptions) -> str:
    """The ``deepfake-dist prepare`` command that makes the set of ``opts`` again, as its manifest
    records it: the options as given (``None`` source options left out), spelled one way."""
    used = {k: v for k, v in opts.options.items() if v is not None}
    kept = parse_splits(opts.splits)
    same = replace(opts, format=_format(opts.format), split=parse_split(opts.split), options=used, overwrite=False,
                   splits=None if kept == SPLITS else ",".join(kept))
    return command_line("prepare", same)


def _format(fmt: str) -> str:
    return {"jpeg": "jpg"}.get(str(fmt).lower(), str(fmt).lower())


def _check_args(fmt: str, resolution: int | None, shard_size: int | None, workers: int, quality: int) -> str:
    """The shard image format, normalised (``jpeg`` -> ``jpg``); a bad argument is a UserError
    (``None`` resolution or shard size: the default, which needs no check)."""
    fmt = _format(fmt)
    if fmt not in imageio.FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(imageio.FORMATS)}")
    for name, value, low in (("--resolution", resolution, 8), ("--shard-size", shard_size, 1), ("--workers", workers, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise UserError(f"{name} {value}: expected an integer >= {low}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: expected an integer from 1 to 100")
    return fmt


def _manifest_fields(src: Source, name: str, encoding: Encoding, fractions: Sequence[float], opts: PrepareOptions,
                     created: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about a prepared set: every setting that made it."""
    jpg = encoding.fmt == "jpg"
    video = src.preprocessing.get("video") or {}
    return {
        "name": name,
        "source": src.spec,
        "resolution": encoding.resolution,
        "format": encoding.fmt,
        "channels": 1 if encoding.mode == "L" else 3,
        "mode": encoding.mode,
        "frames": src.frames,  # images per sample (a clip's f000.., f001..); None: one image
        # a clip's sound (``data.audio``): counts and the longest clip's samples are added as the set is published
        "audio": {"sample_rate": video["audio_sample_rate"], "channels": 1, "format": video["audio_format"]}
        if video.get("audio") else None,
        "preprocessing": {
            "exif_transpose": True, "crop": "center", "resize_filter": imageio.RESIZE_FILTER,
            "jpeg_quality": encoding.quality if jpg else None,
            "jpeg_subsampling": imageio.JPEG_SUBSAMPLING if jpg else None,
            **src.preprocessing,
        },
        "split": {"fractions": list(fractions), "seed": opts.seed,
                  "assigned_by_fractions": sum(1 for item in src.items if item.split is None)},
        "shard_size": opts.shard_size,
        "label": opts.label,
        "created": created,
    }
