"""Write a shard set from every rank: plan its layout, write its shards over workers x ranks,
publish it with its manifest. ``prepare`` (a source's inputs) and ``generate`` (a generator's
images) both write through here; on every rank::

    writer = ShardSetWriter(out, overwrite, state, workers)     # refuses a non-empty out
    plans = plan_shards(items, fractions, seed, shard_size)
    writer.write(writer.jobs(plans, Encoding(mode, resolution, fmt, quality)), progress)
    manifest = writer.finish(fields, skipped, inputs)            # fields: on the main process

Output: ``out/{train,val,test}-NNNNNN.tar`` (names contiguous from 000000 per split) and
``out/manifest.json``, written last and atomically, so a set with a manifest is always complete.
``out`` is a folder or an ``s3://bucket/prefix`` (``locations``); there, each shard is written
to a local temporary folder and uploaded as soon as it closes, the manifest last.

Determinism. The shard layout is planned before any image is decoded: items whose split the
source does not fix are assigned by a seeded shuffle of their sorted keys (per label, so both
splits get the same real/fake ratio), each split's items are put in a seeded order and cut into
shards of ``shard_size``. Units of work (``unit = rank * workers + worker``) each take a
contiguous run of those planned shards. So the shards' bytes, and the manifest ``id``, are the
same whatever ``workers`` and number of ranks made them (tar mtimes are fixed at 0). An input
that cannot be decoded is skipped and recorded; its shard is then short by one. The plan counts
inputs: one that yields several samples (a video's clips, ``common.Expanded``) puts them all in
its shard, so ``shard_size`` counts videos there.

Parallelism. Ranks come from the caller's ``accelerate.PartialState``
(``engine.distributed.distributed_state``); each rank runs its ``workers`` units in spawned
processes. Units write into ``out/.tmp/unit-G/``; after a barrier the main process renames the
shards to their final names and writes the manifest; the other ranks wait at a final barrier.
With several nodes, ``out`` must be on a filesystem all of them see, or in S3.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from deepfake_dist.data import imageio, locations
from deepfake_dist.data.common import LABEL_NAMES, SPLITS, Expanded, Item, Sample
from deepfake_dist.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PATTERN,
    file_sha256,
    load_manifest,
    manifest_id,
)
from deepfake_dist.errors import UserError, disk_full, disk_full_error

TMP_DIR = ".tmp"
TAR_MTIME = 0  # fixed member mtimes: same inputs + settings -> same shard bytes


@dataclass(frozen=True)
class Encoding:
    """How every image of the set is stored: ``mode`` ("L"/"RGB"), centre-cropped and resized to
    ``resolution``, encoded as ``fmt`` ("png"/"jpg", JPEG at ``quality``)."""

    mode: str
    resolution: int
    fmt: str
    quality: int = 95


@dataclass
class ShardPlan:
    """One planned shard: its split, its index in that split (before empty ones are dropped)
    and the items that go into it, in order."""

    split: str
    index: int
    items: list[Item] = field(default_factory=list)


@dataclass
class UnitJob:
    """What one worker process writes (picklable: sent to spawned workers): shards into the local
    folder ``staging``, each uploaded to ``publish_to`` as it closes when the set is remote."""

    unit: int
    staging: str
    shards: list[ShardPlan]
    encoding: Encoding
    publish_to: str | None = None


# ------------------------------------------------------------------------------- planning


def parse_split(split: Sequence[float] | str) -> tuple[float, float, float]:
    """``(train, val, test)`` fractions from a sequence or ``"0.8,0.1,0.1"``; they must sum to 1."""
    text = split if isinstance(split, str) else ",".join(map(str, split))
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 or math.isnan(v) for v in values) or abs(sum(values) - 1) > 1e-6:
        raise UserError(f"--split {text}: expected three fractions train,val,test that are >= 0 and sum to 1, e.g. 0.8,0.1,0.1")
    return values  # type: ignore[return-value]


def _assign_splits(items: Sequence[Item], fractions: Sequence[float], seed: int) -> dict[str, list[Item]]:
    """Items per split, each list in a seeded order (so shards mix labels).

    Items with ``split=None`` are assigned per label: seeded shuffle of the sorted keys, then the
    first ``round(n * train)`` go to train, up to ``round(n * (train + val))`` to val, the rest to
    test. Depends only on the keys, labels, fractions and seed."""
    out: dict[str, list[Item]] = {split: [] for split in SPLITS}
    free: dict[int, list[Item]] = {}
    for item in items:
        if item.split is None:
            free.setdefault(item.label, []).append(item)
        else:
            out[item.split].append(item)
    for label, group in sorted(free.items()):
        group = sorted(group, key=lambda it: it.key)
        random.Random(f"{seed}:split:{label}").shuffle(group)
        n = len(group)
        cut1 = round(n * fractions[0])
        cut2 = max(cut1, round(n * (fractions[0] + fractions[1])))
        out["train"] += group[:cut1]
        out["val"] += group[cut1:cut2]
        out["test"] += group[cut2:]
    for split, group in out.items():
        group.sort(key=lambda it: it.key)
        random.Random(f"{seed}:order:{split}").shuffle(group)
    return out


def plan_shards(items: Sequence[Item], fractions: Sequence[float], seed: int, shard_size: int) -> list[ShardPlan]:
    """All shards of the set, train then val then test, each cut into ``shard_size`` items."""
    plans = []
    for split, group in _assign_splits(items, fractions, seed).items():
        for index, start in enumerate(range(0, len(group), shard_size)):
            plans.append(ShardPlan(split, index, group[start : start + shard_size]))
    return plans


def _split_units(plans: list[ShardPlan], n_units: int) -> list[list[ShardPlan]]:
    """``n_units`` contiguous, near-equal runs of the planned shards (some empty if few shards)."""
    n = len(plans)
    return [plans[u * n // n_units : (u + 1) * n // n_units] for u in range(n_units)]


# -------------------------------------------------------------------------------- writing

_tick: Callable[[int], None] | None = None  # progress hook of this process


def _init_worker(counter) -> None:
    global _tick

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _tick = tick


def _encode_image(img, enc: Encoding) -> bytes:
    return imageio.encode(imageio.preprocess(img, enc.mode, enc.resolution), enc.fmt, enc.quality)


def _encode_item(item: Item, enc: Encoding) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[dict]]:
    """The item's encoded samples (all of them, or an exception: never half an input), the parts
    of it that yielded none, and the samples' json. A clip's frames become members ``f000.<fmt>``,
    ``f001.<fmt>``...; the item's and the sample's own extra members (a clip's sound) go beside them."""
    loaded = item.load()
    parts = loaded if isinstance(loaded, Expanded) else Expanded([Sample("", loaded)])
    samples, metas = [], []
    for part in parts.samples:
        if isinstance(part.image, list):
            images = {f"f{i:03d}.{enc.fmt}": _encode_image(img, enc) for i, img in enumerate(part.image)}
        else:
            images = {enc.fmt: _encode_image(part.image, enc)}
        metas.append({**item.meta, **part.meta})
        samples.append({"__key__": item.key + part.suffix, **images, **item.members, **part.members,
                        "cls": str(item.label).encode(), "json": json.dumps(metas[-1], sort_keys=True).encode()})
    return samples, parts.dropped, metas


def _tally_audio(tally: dict[str, int], metas: list[dict]) -> None:
    """Count clips with and without sound (json ``audio``) and the longest sound, for the manifest."""
    for meta in metas:
        if "audio" in meta:
            tally["clips" if meta["audio"] else "without_audio"] += 1
            tally["samples"] = max(tally["samples"], int(meta.get("audio_samples", 0)))


def _write_unit(job: UnitJob) -> dict[str, Any]:
    """Write this unit's planned shards with ``webdataset.ShardWriter``; returns (and saves as
    ``report.json`` beside them) each shard's counts, size and sha256, and the skips."""
    import webdataset as wds

    staging = Path(job.staging)
    staging.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    audio = {"clips": 0, "without_audio": 0, "samples": 0}
    closed: dict[str, dict[str, Any]] = {}

    def publish(fname: str) -> None:
        """A shard closed: its size and sha256; a remote set's is uploaded now and its local copy freed."""
        path = Path(fname)
        closed[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        if job.publish_to is not None:
            locations.upload(path, locations.join(job.publish_to, path.name))
            path.unlink()

    for split, run in groupby(job.shards, key=lambda p: p.split):
        run = list(run)  # consecutive indices of one split
        pattern = str(staging).replace("%", "%%") + os.sep + f"{split}-%06d.tar"
        # The layout is planned: the writer starts at this run's first index and we move it to
        # the next file at each planned boundary (so skipped inputs never shift later shards,
        # and an input with several samples never spills into the next one).
        writer = wds.ShardWriter(
            pattern, maxcount=float("inf"), maxsize=float("inf"), start_shard=run[0].index,
            verbose=0, encoder=False, mtime=TAR_MTIME, post=publish,
        )
        try:
            for n, plan in enumerate(run):
                if n:
                    writer.next_stream()
                counts = {label: 0 for label in LABEL_NAMES}
                for item in plan.items:
                    try:
                        samples, dropped, metas = _encode_item(item, job.encoding)
                    except Exception as err:  # noqa: BLE001 - a bad input never stops the set, it is recorded
                        reason = f"{type(err).__name__}: {err}".strip().rstrip(":")
                        skipped.append({"input": item.origin or item.key, "key": item.key, "reason": reason})
                    else:
                        for sample in samples:
                            writer.write(sample)
                        counts[LABEL_NAMES[item.label]] += len(samples)
                        _tally_audio(audio, metas)
                        skipped += [{"input": item.origin or item.key, "key": item.key, **d} for d in dropped]
                    if _tick is not None:
                        _tick(1)
                shards.append({"split": split, "index": plan.index, "file": f"{split}-{plan.index:06d}.tar",
                               "samples": sum(counts.values()), **counts})
        finally:
            writer.close()
    for shard in shards:
        shard.update(closed[shard["file"]])
    report = {"unit": job.unit, "shards": shards, "skipped": skipped, "audio": audio}
    _write_json(locations.join(job.publish_to or job.staging, "report.json"), report)
    return report


def _run_units(jobs: list[UnitJob], workers: int, progress: bool) -> None:
    """Run this rank's units: inline when one process is enough, else in spawned processes."""
    global _tick
    for job in jobs:
        if not job.shards:
            _write_unit(job)  # an empty report, so the main process knows this unit finished
    busy = [job for job in jobs if job.shards]
    total = sum(len(plan.items) for job in busy for plan in job.shards)
    bar, task = _progress_bar(progress, total)
    try:
        if workers == 1 or len(busy) <= 1:
            _tick = (lambda n: bar.advance(task, n)) if bar else None
            try:
                for job in busy:
                    _write_unit(job)
            finally:
                _tick = None
            return
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ProcessPoolExecutor(len(busy), mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
            futures = [pool.submit(_write_unit, job) for job in busy]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                if bar:
                    bar.update(task, completed=counter.value)
                if any(f.exception() for f in done):
                    for f in pending:
                        f.cancel()
                    break
            for f in futures:
                if f.done():
                    f.result()  # re-raise a worker's error here
    finally:
        if bar:
            bar.stop()


def _progress_bar(show: bool, total: int):
    if not show:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = bar.add_task("sharding", total=total)
    bar.start()
    return bar, task


# ------------------------------------------------------------------------------- finishing


def _write_json(url: str, data: Any) -> None:
    """Atomic: a reader sees the old file or the complete new one, never a partial one."""
    locations.write_bytes(url, (json.dumps(data, indent=1) + "\n").encode())


def _check_output(out: str, overwrite: bool) -> None:
    locations.check_writable(out)
    if not locations.is_remote(out) and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the shard set")
    if locations.list_names(out, folders=True) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace the shard set there, or choose another --out")


def _clear_output(out: str) -> None:
    """Remove what a previous prepare left (manifest first, then shards and .tmp); nothing else."""
    locations.remove(locations.join(out, MANIFEST_NAME))
    locations.remove_tree(locations.join(out, TMP_DIR))
    for name in locations.list_names(out):
        if SHARD_PATTERN.match(name) or (name.startswith(f".{MANIFEST_NAME}.") and name.endswith(".tmp")):
            locations.remove(locations.join(out, name))


@contextmanager
def _out_of_space(out: str):
    """A write into the set refused for lack of space (a full disk, a quota, a file-size limit)
    becomes one line naming ``out``, after what the failed write left there (shards, ``.tmp``, a
    partial manifest) is removed: nothing half-written is left looking like a finished set."""
    try:
        yield
    except Exception as err:
        if not disk_full(err):
            raise
        with suppress(OSError):
            _clear_output(out)
        raise disk_full_error(f"shard set {out}", out, err,
                              "nothing was kept (no manifest.json, no shards); free space and rerun") from None


def _finalize(out: str, n_units: int, fields: dict[str, Any], pre_skipped: list[dict[str, str]],
              inputs: int) -> dict[str, Any]:
    """Main process: gather the units' reports, rename shards contiguously, write the manifest."""
    tmp = locations.join(out, TMP_DIR)
    found: list[tuple[int, dict[str, Any]]] = []
    skipped = list(pre_skipped)
    audio = {"clips": 0, "without_audio": 0, "samples": 0}
    for unit in range(n_units):
        unit_dir = locations.join(tmp, f"unit-{unit}")
        try:
            report = json.loads(locations.read_bytes(locations.join(unit_dir, "report.json")))
        except FileNotFoundError:
            raise RuntimeError(f"sharding unit {unit} left no report in {unit_dir}; did a rank or worker fail?") from None
        found += [(unit, shard) for shard in report["shards"]]
        skipped += report["skipped"]
        audio = {k: max(v, report["audio"][k]) if k == "samples" else v + report["audio"][k] for k, v in audio.items()}
    if fields.get("audio") is not None:  # the set's sound: how many clips have it, and the longest
        fields = {**fields, "audio": {**fields["audio"], **audio}}
    found.sort(key=lambda us: (SPLITS.index(us[1]["split"]), us[1]["index"]))
    shards: list[dict[str, Any]] = []
    counts = {split: {label: 0 for label in (*LABEL_NAMES, "total")} for split in SPLITS}
    next_index = {split: 0 for split in SPLITS}
    for unit, shard in found:
        if shard["samples"] == 0:  # every input of this shard was skipped
            continue
        split = shard["split"]
        name = f"{split}-{next_index[split]:06d}.tar"
        next_index[split] += 1
        locations.move(locations.join(tmp, f"unit-{unit}", shard["file"]), locations.join(out, name))
        shards.append({"split": split, "file": name, "samples": shard["samples"],
                       **{label: shard[label] for label in LABEL_NAMES},
                       "bytes": shard["bytes"], "sha256": shard["sha256"]})
        for label in LABEL_NAMES:
            counts[split][label] += shard[label]
        counts[split]["total"] += shard["samples"]
    skipped.sort(key=lambda s: s["input"])
    if not shards:
        first = f" (first: {skipped[0]['input']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"--source {fields['source']}: none of its {inputs} inputs could be decoded{first}")
    manifest = {"format_version": FORMAT_VERSION, "id": manifest_id(shards), **fields,
                "counts": counts, "shards": shards, "skipped": skipped}
    _write_json(locations.join(out, MANIFEST_NAME), manifest)
    locations.remove_tree(tmp)
    return manifest


def created_info(command: str, workers: int, world_size: int) -> dict[str, Any]:
    """The manifest's ``created`` record: how, when and with what the set was made."""
    return {"command": command, "package_version": _versions()["deepfake_dist"], "versions": _versions(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workers": workers, "world_size": world_size}


def _versions() -> dict[str, str]:
    import PIL
    import webdataset

    from deepfake_dist import __version__

    return {"deepfake_dist": __version__, "python": platform.python_version(),
            "pillow": PIL.__version__, "webdataset": webdataset.__version__}


# --------------------------------------------------------------------------------- the set


class ShardSetWriter:
    """One shard set written by every rank (see the module's docstring). Each rank makes one
    with the same arguments; ``out`` is checked here, so all ranks raise or none."""

    def __init__(self, out: str | Path, overwrite: bool, state, workers: int = 1):
        self.out, self.state, self.workers = str(out), state, workers
        self.n_units = state.num_processes * workers
        remote = locations.is_remote(self.out)
        self.name = locations.set_name(self.out if remote else Path(self.out).resolve())
        self.tmp = locations.join(self.out, TMP_DIR) if remote else str((Path(self.out) / TMP_DIR).resolve())
        # where the units write their shards: beside the set, or (a remote set) on this machine
        self.staging = tempfile.mkdtemp(prefix="deepfake_dist-shards-") if remote else self.tmp
        _check_output(self.out, overwrite)

    def jobs(self, plans: list[ShardPlan], encoding: Encoding) -> list[UnitJob]:
        """This rank's units: each a contiguous run of the planned shards (some may be empty)."""
        runs = _split_units(plans, self.n_units)
        first = self.state.process_index * self.workers
        publish = self.tmp if self.staging != self.tmp else None
        return [UnitJob(u, os.path.join(self.staging, f"unit-{u}"), runs[u], encoding,
                        publish and locations.join(publish, f"unit-{u}")) for u in range(first, first + self.workers)]

    def write(self, jobs: list[UnitJob], progress: bool = False) -> None:
        """Clear what a previous write left in ``out`` (main process, once every rank has checked
        it), then write this rank's units (``progress``: a rich bar on the main process)."""
        with _out_of_space(self.out):
            self.state.wait_for_everyone()  # nobody writes before every rank has checked the output folder
            if self.state.is_main_process:
                _clear_output(self.out)
                if not locations.is_remote(self.out):
                    Path(self.tmp).mkdir(parents=True, exist_ok=True)
            self.state.wait_for_everyone()
            try:
                _run_units(jobs, self.workers, progress and self.state.is_main_process)
            finally:
                if self.staging != self.tmp:
                    shutil.rmtree(self.staging, ignore_errors=True)

    def finish(self, fields: dict[str, Any] | None, skipped: list[dict[str, str]], inputs: int) -> dict[str, Any]:
        """Publish the shards and the manifest; every rank returns the manifest. The main process
        passes the manifest's ``fields`` (the set's settings), the inputs the source rejected
        while listing them (``skipped``) and how many inputs there were in all; the others None."""
        with _out_of_space(self.out):
            self.state.wait_for_everyone()
            manifest: dict[str, Any] | None = None
            error: BaseException | None = None
            if self.state.is_main_process:
                try:
                    manifest = _finalize(self.out, self.n_units, fields, skipped, inputs)
                except BaseException as err:  # noqa: BLE001 - reach the last barrier anyway, then re-raise
                    error = err
            self.state.wait_for_everyone()
            if error is not None:
                raise error
            if manifest is None:
                if not locations.exists(locations.join(self.out, MANIFEST_NAME)):
                    raise UserError(f"--out {self.out}: the main process wrote no manifest; see its error above")
                manifest = load_manifest(self.out)
            return manifest
