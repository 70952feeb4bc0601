"""WebDataset loaders for training and evaluation.

Training resamples shards (as open_clip's ``--dataset-resampled``): each (rank, worker) draws
shards from all sets with its own seeded RNG and yields exactly ``batches_per_worker`` full
batches, so every rank sees the same number of batches per epoch whatever the shard sizes
(unequal counts hang DDP). The stream depends only on (seed, epoch, rank, worker) and each
sample's augmentation only on (seed, epoch, key), so a run resumed in the middle of an epoch
gets the same batches without making the ones before its resume point: each worker draws the
samples it already handed over (same shard choices, same shuffle buffer, same random draws) with
only their tar headers read, and starts decoding at the first sample it still owes (see
``TrainStream``). Shards stream from any location (a folder, HTTP, S3: ``locations``).

Evaluation reads every shard of the split exactly once: shards are split over ranks and
workers, nothing is resampled or dropped, and the caller gathers the predictions at the end.

Unreadable data (a truncated or garbage shard, an image that does not decode, a shard deleted
mid-run) never kills a worker: the stream records a ``ReadProblem`` naming the shard and sample,
moves on, and hands the problems to the main process on its next ``Batch``. There
``ShardLoader`` applies the policy: training with ``data.on_error: skip`` warns once per problem
and the loop counts them (``train/skipped_samples``, ``train/unreadable_shards``); ``raise``, and
evaluation always, stop with a one-line ``UserError``. A training stream that can read no shard
any more (every one failed, or ``MAX_FAILURES_IN_ROW`` in a row: a shared filesystem or a store
gone) gives up, and the loader raises ``DataUnavailable`` rather than wait for data that does not
come; under ``raise`` the first unreadable shard stops it.

A sample is one image (C, H, W) or, in a clip set (manifest ``frames``: K), a clip (K, C, H, W)
from its members ``f000.<fmt>``, ``f001.<fmt>``, ... in order; in sets with sound it also carries
the clip's waveform and per-stream labels (``Batch.extra``, see ``data.audio``). The transforms act on the whole
clip tensor, so every frame of a clip gets the same random crop, flip, jitter, JPEG and blur.

Workers hand over uint8 images, stacked into shared-memory buffers they reuse and the training
process keeps (``handoff.HandOffRing``); ``ShardLoader`` moves each batch to its device and
scales and normalises it there (``transforms.Normalize``): handing over float32, in new shared
memory each time, spends a worker's time in page faults (BENCHMARKS.md, loader).
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import multiprocessing
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from rich.markup import escape
from torch.utils.data import IterableDataset, get_worker_info

from deepfake_dist.config import DataConfig
from deepfake_dist.console import console
from deepfake_dist.data import locations, transforms
from deepfake_dist.data.audio import audio_samples, decode_extra
from deepfake_dist.data.common import FRAME_KEY, IMAGE_KEYS, DataUnavailable, ReadProblem
from deepfake_dist.data.handoff import HandOffRing
from deepfake_dist.data.labels import LabelRule
from deepfake_dist.data.manifest import (
    listed_shards,
    load_manifest,
    missing_locally,
    missing_shard_error,
    set_location,
    shard_urls,
    split_count,
)
from deepfake_dist.data.tarstream import Span, tar_samples
from deepfake_dist.errors import UserError

MAX_FAILURES_IN_ROW = 32  # unreadable shards in a row before a training stream gives up


def _reason(err: BaseException) -> str:
    """One line for an error from tarfile, webdataset or the image decoder."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:  # webdataset appends " @ <stream>" and the url to the args
        text = str(err.args[0]).split(" @ ")[0] if err.args else ""
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)  # torchvision's "decode_jpeg, file.cpp:171, " prefix
    return " ".join(f"{type(err).__name__}: {text}".split()).rstrip(":")


class _GiveUp(Exception):
    """A training stream stops reading: no shard it may draw can be read (the message says why)."""


class _ShardFailures:
    """The shards a training stream failed to read, in a row and by URL. Resampling draws shards
    for ever, so with every shard gone it would retry them for ever; this gives up when every
    shard failed at its last reading, or ``limit`` did in a row (1 under ``on_error: raise``)."""

    def __init__(self, urls: list[str], limit: int):
        self.urls, self.limit = set(urls), limit
        self.bad: set[str] = set()
        self.in_row = 0

    def add(self, url: str, failed: bool) -> None:
        if not failed:
            self.in_row = 0
            self.bad.discard(url)
            return
        self.in_row += 1
        self.bad.add(url)
        if self.bad >= self.urls and self.limit > 1:
            raise _GiveUp(f"none of the {len(self.urls)} training shards could be read")
        if self.in_row >= self.limit:
            raise _GiveUp(f"{self.in_row} training shards in a row could not be read")


def _read_shards(urls, expected: dict[str, int], problems: list[ReadProblem],
                 want: Callable[[str], Callable | None] = lambda url: None, failures: _ShardFailures | None = None):
    """Samples of each shard in turn. A shard that breaks (truncated, not a tar, gone) or ends
    short of its manifest count adds a problem naming it and the last sample read, and the stream
    goes on with the next shard (``failures`` may give up). ``want(url)``: which members of the
    shard to read (``tar_members``)."""
    for url in urls:
        last, count = None, 0
        try:
            for sample in tar_samples(url, want(url)):  # not wds.tarfile_to_samples: see data/tarstream.py
                last, count = sample["__key__"], count + 1
                yield sample
        except (OSError, tarfile.TarError, ValueError) as err:  # give up on this shard only
            problems.append(ReadProblem(url, last, _reason(err), sample=False))
            if failures is not None:
                failures.add(url, failed=True)
        else:
            if count < expected.get(url, 0):
                problems.append(ReadProblem(url, last, f"it ends after {count} of its {expected[url]} samples",
                                            sample=False))
            if failures is not None:
                failures.add(url, failed=False)


@dataclass(frozen=True)
class ShardLabels:
    """How the samples of each shard are labelled (``rules``, by shard URL; ``cls`` for one not
    listed), and the (URL, key) of the samples a manifest lists as unusable (no image or no
    label, in a set ``shards index`` made), which the streams pass over without a problem."""

    rules: dict[str, LabelRule] = field(default_factory=dict)
    unusable: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, sets: list[str], split: str) -> ShardLabels:
        rules, unusable = {}, set()
        for shard_set in sets:
            manifest = load_manifest(shard_set)
            rule = LabelRule.from_manifest(manifest)
            rules.update((url, rule) for url, _ in listed_shards(shard_set, split))
            location = set_location(shard_set)
            unusable.update((locations.join(location, u["shard"]), u["key"]) for u in manifest.get("unusable", []))
        return cls(rules, frozenset(unusable))

    def rule(self, url: str) -> LabelRule:
        return self.rules.get(url, _CLS)

    def known_unusable(self, sample: dict) -> bool:
        return (sample["__url__"], sample["__key__"]) in self.unusable


_CLS = LabelRule()


def _decode_or_report(sample: dict, channels: int, labels: ShardLabels, problems: list[ReadProblem],
                      audio: int | None = None) -> tuple | None:
    if labels.known_unusable(sample):
        return None
    try:
        return _decode_sample(sample, channels, labels.rule(sample["__url__"]), audio)
    except Exception as err:  # noqa: BLE001 - any undecodable sample is reported, not fatal to the worker
        problems.append(ReadProblem(sample.get("__url__", "?"), sample.get("__key__"), _reason(err), sample=True))
        return None


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader that applies the ``on_error`` policy to the problems its workers report with
    each batch: ``skip`` warns once per problem on this rank's console, ``raise`` stops with a
    UserError (``hint`` says what to do; ``{set}`` in it becomes the shard's set). Batches that
    only carry problems are not yielded. With ``batch_size`` the workers' hand-offs (groups of
    batches, as WebDataset's re-batching in the main process) are split into batches of that
    size; each batch is then moved to ``device`` (None: it stays on the CPU) and normalised there.
    Workers lower their scheduling priority by ``worker_nice`` (``data.worker_nice``)."""

    def __init__(self, dataset, normalize: transforms.Normalize, on_error: str, hint: str, rank: int, world: int,
                 batch_size: int | None = None, device: torch.device | None = None, worker_nice: int = 0, **kwargs):
        init = functools.partial(_lower_priority, worker_nice) if worker_nice and kwargs.get("num_workers") else None
        super().__init__(dataset, batch_size=None, worker_init_fn=init, **kwargs)
        self.normalize, self.device = normalize, device
        self.on_error, self.hint, self.split_size = on_error, hint, batch_size
        self.prefix = f"rank {rank}: " if world > 1 else ""
        self.warned: set[ReadProblem] = set()
        self.forked = False

    def __iter__(self):
        if self.num_workers and not (self.persistent_workers and self.forked):  # workers start now
            _freeze_before_fork()
            self.dataset.ring.workers_started()
            self.forked = True
        for handed in super().__iter__():
            try:
                yield from self._batches(handed)
            finally:  # also when the consumer stops early: the worker may refill the slot
                self.dataset.ring.done(handed)

    def _batches(self, handed):
        """The ``on_error`` policy for the hand-off's problems, then its batches on the device, normalised."""
        for problem in handed.problems:
            if self.on_error == "raise":
                raise UserError(f"{problem}; {self.hint.format(set=locations.split(problem.shard)[0])}")
            if problem not in self.warned:
                self.warned.add(problem)
                console.print(f"{self.prefix}[yellow]warning:[/yellow] {escape(str(problem))}; skipped "
                              "(data.on_error: skip)")
        if handed.ended:
            last = f" (the last: {handed.problems[-1]})" if handed.problems else ""
            raise DataUnavailable(f"{self.prefix}{handed.ended}{last}; check that the shard sets are reachable "
                                  "(deepfake-dist shards verify SET), then rerun to resume")
        for part in handed.split(self.split_size) if self.split_size else [handed]:
            if not len(part):
                continue
            if self.device is not None:
                part = part.to(self.device)
            part.image = self.normalize(part.image)  # per batch: its float copy is the one training holds
            yield part


def _lower_priority(increment: int, worker_id: int) -> None:
    """A worker's ``worker_init_fn``: its niceness goes up by ``increment``. Under CPU contention
    (workers on every core) the training process, which launches the GPU's kernels one by one,
    then keeps its core (BENCHMARKS.md, gpu)."""
    os.nice(increment)


def _freeze_before_fork() -> None:
    """Python's ``gc.freeze`` recipe for processes that fork: collect, then move every object
    still alive out of the garbage collector's reach. Otherwise the first full collection in the
    training process (or a worker) writes to the header of every object the two share, which
    copies its page, and each worker ends up holding private copies of the training process's
    objects (BENCHMARKS.md, loader). Frozen objects are still freed when their count
    drops to zero; only reference cycles among them are never collected."""
    gc.collect()
    gc.freeze()


def resolve_channels(cfg: DataConfig, sets: list[str]) -> int:
    """``auto``: 1 when any set is grey, so that colour can never tell real from fake."""
    if cfg.channels != "auto":
        return cfg.channels
    return min(int(load_manifest(s).get("channels", 3)) for s in sets)


def manifest_ids(sets: list[str]) -> dict[str, str]:
    return {s: load_manifest(s)["id"] for s in sets}


def clip_frames(sets: list[str]) -> int | None:
    """Frames per sample of these sets (``None``: single images). Clips of different lengths, or
    clips and images, cannot share a batch, so sets that disagree are refused."""
    frames = {s: load_manifest(s).get("frames") for s in sets}
    if len(set(frames.values())) > 1:
        found = ", ".join(f"{s}: {f or 1}" for s, f in frames.items())
        raise UserError(f"data sets hold samples of different frame counts ({found}); use sets prepared "
                        "with the same --frames (clip models) or --frame-level sets (image models)")
    return next(iter(frames.values()), None)


def _image_keys(sample: dict) -> list[str]:
    """The sample's image member, or its clip's frames in order."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is not None:
        return [key]
    frames = sorted(k for k in sample if FRAME_KEY.match(k))
    if not frames:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
    return frames


def _decode_sample(sample: dict, channels: int, rule: LabelRule, audio: int | None = None) -> tuple:
    """(image or clip, label, key, json bytes, extra): ``extra`` holds the sound and per-stream
    labels (``data.audio.decode_extra``) when the sets have sound (``audio``: its samples)."""
    if any(isinstance(value, Span) for value in sample.values()):
        _fill([sample])
    keys = _image_keys(sample)
    label = rule.label(sample)
    if len(keys) == 1 and not FRAME_KEY.match(keys[0]):
        image = transforms.decode(sample[keys[0]], channels)
    else:
        image = torch.stack([transforms.decode(sample[k], channels) for k in keys])  # (T, C, H, W)
    # keys are unique within a set; the set's name makes them unique across sets. The json
    # member stays bytes until something reads it (``Batch.meta``).
    extra = decode_extra(sample, label, audio) if audio else {}
    return image, label, f"{_set_name(sample['__url__'])}/{sample['__key__']}", sample.get("json", b"{}"), extra


def _fill(samples: list[dict]) -> None:
    """Read the members of ``samples`` that were passed over (``Span``): one request per shard,
    from the first such member to the end of the last."""
    spans: dict[str, list[tuple[dict, str, Span]]] = {}
    for sample in samples:
        for ext, value in sample.items():
            if isinstance(value, Span):
                spans.setdefault(sample["__url__"], []).append((sample, ext, value))
    for url, found in spans.items():
        start = min(span.start for _, _, span in found)
        data = locations.read_range(url, start, max(span.start + span.size for _, _, span in found))
        for sample, ext, span in found:
            sample[ext] = data[span.start - start:span.start - start + span.size]


@functools.lru_cache(maxsize=4096)
def _set_name(url: str) -> str:
    """The name of a shard's set (cached: splitting a path per sample costs more than the shard read)."""
    return locations.set_name(locations.split(url)[0])


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless seeded shard resampling, cut to ``batches_per_worker`` batches per epoch, yielded
    ``per_transfer`` batches at a time as one ``Batch`` (the loader splits them again).

    Resuming at batch B of an epoch (``set_epoch(epoch, B)``): the DataLoader takes each
    worker's hand-offs in turn, so B says which worker's group holds batch B and how many
    batches each worker had made before it (``resume_plan``). Each worker draws those batches'
    samples exactly as it did (the same RNG, shard choices and shuffle buffer: what the stream's
    state is made of), reading only tar headers and the label member, and deciding only what
    needs no decode (has an image, has a label); the samples still in the shuffle buffer are then
    read, one request per shard. The worker holding batch B makes its group from B on, and the
    workers take their turns from it (worker i plays worker (i + first) % workers for that epoch),
    so the batches are those an uninterrupted epoch makes from B. Augmentation is keyed by
    (seed, epoch, key), so it needs no state. One case differs: an image whose bytes do not decode
    among the skipped samples is counted as trained, and that worker's stream runs one sample
    ahead of an uninterrupted one from there (the run warned of the image when it met it)."""

    audio: int | None = None  # samples of each clip's sound when the sets have sound (``data.audio``)

    def __init__(self, urls, cfg: DataConfig, channels: int, rank: int, batches_per_worker: int, seed: int,
                 expected: dict[str, int] | None = None, per_transfer: int = 1, labels: ShardLabels | None = None):
        self.urls, self.cfg, self.channels, self.rank, self.seed = urls, cfg, channels, rank, seed
        self.expected = expected or {}  # url -> samples the manifest lists (to notice a truncated shard)
        self.labels = labels or ShardLabels()
        self.missing: list[str] = []  # listed shards that were not there at the start (skipped)
        self.batches_per_worker, self.per_transfer = batches_per_worker, per_transfer
        self.transform = transforms.TrainAugment(cfg.resolution, cfg.augment)
        self.ring = HandOffRing(cfg.num_workers)
        self._epoch = multiprocessing.Value("i", 0)  # shared with persistent workers
        self._start = multiprocessing.Value("q", 0)  # the batch of the epoch to start at (a resumed run)
        self._ahead: tuple[tuple[int, int], Iterator] | None = None  # ((epoch, 0), its groups), in a worker

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """The next pass is ``epoch``, from its batch ``batch`` (a run resumed mid-epoch)."""
        self._epoch.value, self._start.value = epoch, batch

    def _augment(self, items: list[tuple], epoch: int) -> list[tuple]:
        """Each image augmented with the CPU generator seeded from its key, inside one fork of
        the generator for all: a fork per sample adds its cost to every sample (BENCHMARKS.md, loader)."""
        augmented = []
        with torch.random.fork_rng(devices=[]):
            for image, label, key, *rest in items:
                # the CPU generator only: torch.manual_seed also queues a seed for every accelerator
                # backend, recording a stack trace each time (dearer than the decode: BENCHMARKS.md, loader)
                torch.default_generator.manual_seed(_seed(self.seed, epoch, key))
                augmented.append((self.transform(image), label, key, *rest))
        return augmented

    def __iter__(self):
        self.ring.start_pass()
        epoch, start = self._epoch.value, self._start.value
        worker, workers = _worker()
        first, done = resume_plan(start, workers, self.per_transfer, self.batches_per_worker)
        worker = (worker + first) % workers
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (epoch, start):
            groups = ahead[1]
        else:
            groups = self._groups(epoch, worker, done[worker])
        for items, problems, ended in groups:
            yield self.ring.collate(items, problems, ended)
        if get_worker_info() is not None and self.cfg.persistent_workers:  # it will run the next pass too
            self._ahead = ((epoch + 1, 0), _started(self._groups(epoch + 1, _worker()[0], 0)))

    def _groups(self, epoch: int, worker: int, skip: int) -> Iterator[tuple[list[tuple], list[ReadProblem], str | None]]:
        """``worker``'s pass over ``epoch`` from its batch ``skip``: groups of up to
        ``per_transfer`` batches of augmented samples, each with the problems met since the
        previous one and, last, why the stream gave up if it did."""
        if skip >= self.batches_per_worker:
            return
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        problems: list[ReadProblem] = []
        size = self.cfg.batch_size
        need, taken, made = self.batches_per_worker * size, 0, skip  # samples; batches made (or skipped)
        skipping = skip > 0
        held: list[dict] = []  # the shuffle buffer

        def want(url):  # while skipping, a shard's members are passed over, its labels excepted
            return None if not skipping else (lambda name, rule=self.labels.rule(url): not skipping or rule.reads(name))

        failures = _ShardFailures(self.urls, 1 if self.cfg.on_error == "raise" else MAX_FAILURES_IN_ROW)
        shards = (rng.choice(self.urls) for _ in iter(int, 1))
        samples = _shuffled(_read_shards(shards, self.expected, problems, want, failures), self.cfg.shuffle_buffer,
                            rng, lambda: need - taken, held)
        group: list[tuple] = []
        try:
            for sample in samples:
                if skipping:
                    taken += self._trainable(sample, problems)
                    if problems and self.cfg.on_error == "skip":
                        problems.clear()  # counted by the run that trained on these batches
                    if taken == skip * size:
                        skipping = False
                        _fill_quietly(held)
                else:
                    item = _decode_or_report(sample, self.channels, self.labels, problems, self.audio)
                    if item is not None:
                        group.append(item)
                        taken += 1
                if problems and self.cfg.on_error == "raise":
                    yield [], list(problems), None
                    return
                if group and len(group) % size == 0:
                    made_now = made + len(group) // size
                    if made_now % self.per_transfer == 0 or made_now == self.batches_per_worker:
                        yield self._augment(group, epoch), list(problems), None
                        problems.clear()
                        made, group = made_now, []
                        if made == self.batches_per_worker:
                            return
        except _GiveUp as err:
            yield [], list(problems), str(err)

    def _trainable(self, sample: dict, problems: list[ReadProblem]) -> bool:
        """Whether ``sample`` would be trained on, as far as can be told without decoding it: it
        has an image and a label."""
        if self.labels.known_unusable(sample):
            return False
        try:
            _image_keys(sample)
            self.labels.rule(sample["__url__"]).label(sample)
            return True
        except ValueError as err:
            problems.append(ReadProblem(sample["__url__"], sample["__key__"], _reason(err), sample=True))
            return False


def resume_plan(batch: int, workers: int, per_transfer: int, per_worker: int) -> tuple[int, list[int]]:
    """Where batch ``batch`` of an epoch comes from: the worker whose hand-off holds it, and how
    many batches each worker made before it. The DataLoader takes one hand-off (``per_transfer``
    batches, fewer at a worker's end) from each worker in turn."""
    done = [0] * workers
    while any(d < per_worker for d in done):
        for worker in range(workers):
            size = min(per_transfer, per_worker - done[worker])
            if batch < size:
                done[worker] += batch
                return worker, done
            batch -= size
            done[worker] += size
    return 0, done


def _fill_quietly(samples: list[dict]) -> None:
    """``_fill`` where it can: a shard that cannot be read now is read (and reported) when its
    sample is decoded."""
    try:
        _fill(samples)
    except (OSError, ValueError):
        pass


def _started(groups: Iterator) -> Iterator:
    """``groups`` with its first item made now. A persistent worker makes the next epoch's first
    group at the end of a pass, while the training process still drains the groups prefetched
    from it; the next pass starts by handing it over (if that pass is for the epoch expected),
    so the workers do not all start decoding at once while the GPU waits (BENCHMARKS.md, gpu)."""
    first = next(groups, None)
    return itertools.chain([] if first is None else [first], groups)


def _shuffled(samples: Iterator[dict], buffer: int, rng: random.Random, wanted: Callable[[], int],
              held: list | None = None) -> Iterator[dict]:
    """WebDataset's shuffle buffer (``wds.shuffle``: filled to half before the first draw, two
    reads per draw until full, then one), except that it stops reading once it holds as many
    samples as ``wanted()`` (the epoch's remaining need): ``wds.shuffle`` reads on, and each
    rank's every worker then read a buffer at each epoch's end that was never used. ``held``:
    the buffer (the caller may fill in its samples' unread members)."""
    held = [] if held is None else held
    while wanted() > 0:
        if len(held) < wanted():
            held.append(next(samples))
            if len(held) < min(buffer, wanted()):
                held.append(next(samples))
            if len(held) < buffer // 2 and len(held) < wanted():
                continue
        pick = rng.randrange(len(held))
        held[pick], held[-1] = held[-1], held[pick]
        yield held.pop()


def batches_per_transfer(cfg: DataConfig, channels: int, frames: int | None) -> int:
    """Batches a worker hands over at once: about ``data.transfer_mib`` of uint8 images, at
    least one; one without workers (nothing is handed over)."""
    if cfg.num_workers == 0:
        return 1
    batch_bytes = cfg.batch_size * (frames or 1) * channels * cfg.resolution**2
    return max(int(cfg.transfer_mib * 2**20 // batch_bytes), 1)


def train_loader(cfg: DataConfig, channels: int, rank: int, world: int, seed: int,
                 device: torch.device | None = None) -> tuple[torch.utils.data.DataLoader, TrainStream]:
    """Batches on ``device`` (None: the CPU). A missing local shard is an error under
    ``data.on_error: raise``; under ``skip`` the others are used (with a warning) and the epoch
    shrinks by its samples. Call ``stream.set_epoch(epoch, batch)`` before each pass."""
    listed = [shard for s in cfg.train for shard in listed_shards(s, cfg.train_split)]
    if not listed:
        raise UserError(f"no '{cfg.train_split}' shards in {cfg.train}; check data.train and data.train_split")
    missing = missing_locally([url for url, _ in listed])
    if missing and (cfg.on_error == "raise" or len(missing) == len(listed)):
        raise missing_shard_error(missing[0])
    if missing and rank == 0:
        console.print(f"[yellow]warning:[/yellow] {len(missing)} of the {len(listed)} '{cfg.train_split}' shards "
                      f"listed in the manifests are missing, training on the others (data.on_error: skip): "
                      f"{escape(', '.join(missing))}")
    expected = {url: int(entry.get("samples", 0)) for url, entry in listed if url not in missing}
    urls = list(expected)
    samples = sum(split_count(load_manifest(s), cfg.train_split) for s in cfg.train)
    samples -= sum(int(entry.get("samples", 0)) for url, entry in listed if url in missing)
    workers = max(cfg.num_workers, 1)
    batches_per_rank = max(math.ceil(samples / (cfg.batch_size * world)), 1)
    per_worker = math.ceil(batches_per_rank / workers)
    frames = clip_frames(cfg.train)  # refuses sets whose samples cannot share a batch
    stream = TrainStream(urls, cfg, channels, rank, per_worker, seed, expected,
                         batches_per_transfer(cfg, channels, frames), ShardLabels.of(cfg.train, cfg.train_split))
    stream.missing = missing
    stream.audio = audio_samples(cfg.train)
    hint = ("data.on_error is raise; set it to skip to train on without it, or find what is wrong with "
            "deepfake-dist shards verify {set} and re-create the set")
    loader = ShardLoader(
        stream, transforms.Normalize(channels, cfg.normalize), cfg.on_error, hint, rank, world, cfg.batch_size, device,
        cfg.worker_nice, num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
    )
    return loader, stream


@dataclass(frozen=True)
class EvalOptions:
    """What ``eval_loader`` needs besides the sets: the model's input (resolution, channels,
    normalisation) and the batching and workers; unset, the ``data:`` section's defaults."""

    resolution: int
    channels: int
    normalize: str = DataConfig.normalize
    batch_size: int = DataConfig.batch_size
    num_workers: int = DataConfig.num_workers
    worker_nice: int = DataConfig.worker_nice

    @classmethod
    def from_data(cls, data: DataConfig, channels: int) -> EvalOptions:
        """A training config's: its ``data:`` resolution, normalisation, batch size and workers."""
        return cls(data.resolution, channels, data.normalize, data.batch_size, data.num_workers, data.worker_nice)


class EvalStream(IterableDataset):
    """Every sample of the split once: shards split over ranks then workers, last batch kept."""

    audio: int | None = None  # samples of each clip's sound when the sets have sound (``data.audio``)

    def __init__(self, urls, options: EvalOptions, rank: int, world: int, perturb=None,
                 frames: int | None = None, expected: dict[str, int] | None = None, labels: ShardLabels | None = None):
        self.urls, self.options, self.rank, self.world = urls, options, rank, world
        self.expected = expected or {}
        self.labels = labels or ShardLabels()
        self.transform = transforms.eval_resize(options.resolution, perturb)
        self.sample_shape = (*([frames] if frames else []), options.channels, options.resolution, options.resolution)
        self.ring = HandOffRing(options.num_workers)

    def __iter__(self):
        self.ring.start_pass()
        worker, workers = _worker()
        mine = self.urls[self.rank :: self.world][worker::workers]
        problems: list[ReadProblem] = []
        batch = []
        for sample in _read_shards(mine, self.expected, problems):
            item = _decode_or_report(sample, self.options.channels, self.labels, problems, self.audio)
            if problems:  # every sample counts: stop at the first problem (the loader raises)
                yield self.ring.collate([], problems)
                return
            if item is None:  # listed as unusable by the manifest
                continue
            image, *rest = item
            batch.append((self.transform(image), *rest))
            if len(batch) == self.options.batch_size:
                yield self.ring.collate(batch)
                batch = []
        if problems:  # the last shard ended short
            yield self.ring.collate([], problems)
        elif batch:
            yield self.ring.collate(batch)


def eval_loader(sets: list[str], split: str, options: EvalOptions, rank: int = 0, world: int = 1,
                perturb=None) -> ShardLoader:
    """Every sample of ``split`` in ``sets`` once, this rank's share (the caller gathers the
    predictions). ``perturb``: a picklable transform of the decoded uint8 image (see
    ``transforms.eval_resize``)."""
    urls = [u for s in sets for u in shard_urls(s, split)]  # a missing shard is an error here
    if not urls:
        raise UserError(f"no '{split}' shards in {sets}; prepare the sets with a {split} split")
    expected = {url: int(entry.get("samples", 0)) for s in sets for url, entry in listed_shards(s, split)}
    stream = EvalStream(urls, options, rank, world, perturb, clip_frames(sets), expected,
                        ShardLabels.of(sets, split))
    stream.audio = audio_samples(sets)
    workers = min(options.num_workers, max(len(urls) // world, 1))
    hint = ("evaluation reads every sample, so it stops; find what is wrong with deepfake-dist shards verify {set} "
            "and re-create the set")
    return ShardLoader(stream, transforms.Normalize(options.channels, options.normalize), "raise", hint, rank, world,
                       worker_nice=options.worker_nice, num_workers=workers)
