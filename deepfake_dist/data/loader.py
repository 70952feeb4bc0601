"""WebDataset loaders for training and evaluation.

Training resamples shards (as open_clip's ``--dataset-resampled``): each (rank, worker) draws
shards from all sets with its own seeded RNG and yields exactly ``batches_per_worker`` full
batches, so every rank sees the same number of batches per epoch whatever the shard sizes
(unequal counts hang DDP). The stream depends only on (seed, epoch, rank, worker) and each
sample's augmentation only on (seed, epoch, key), so a resumed run replays the same batches.

Evaluation reads every shard of the split exactly once: shards are split over ranks and
workers, nothing is resampled or dropped, and the caller gathers the predictions at the end.

Unreadable data (a truncated or garbage shard, an image that does not decode, a shard deleted
mid-run) never kills a worker: the stream records a ``ReadProblem`` naming the shard and sample,
moves on, and hands the problems to the main process on its next ``Batch``. There
``ShardLoader`` applies the policy: training with ``data.on_error: skip`` warns once per problem
and the loop counts them (``train/skipped_samples``, ``train/unreadable_shards``); ``raise``, and
evaluation always, stop with a one-line ``UserError``.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape
from torch.utils.data import IterableDataset, get_worker_info

from deepfake_dist.config import DataConfig
from deepfake_dist.console import console
from deepfake_dist.data import transforms
from deepfake_dist.data.audio import audio_samples, decode_extra
from deepfake_dist.data.common import ReadProblem
from deepfake_dist.data.handoff import HandOffRing
from deepfake_dist.data.manifest import listed_shards, load_manifest, missing_shard_error, shard_urls, split_count
from deepfake_dist.data.tarstream import tar_samples
from deepfake_dist.errors import UserError

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
FRAME_KEY = re.compile(r"^f\d{3}\.(jpg|png|jpeg|webp)$")  # a clip's frames: f000.png, f001.png, ...


def _reason(err: BaseException) -> str:
    """One line for an error from tarfile, webdataset or the image decoder."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    else:  # webdataset appends " @ <stream>" and the url to the args
        text = str(err.args[0]).split(" @ ")[0] if err.args else ""
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)  # torchvision's "decode_jpeg, file.cpp:171, " prefix
    return " ".join(f"{type(err).__name__}: {text}".split()).rstrip(":")


def _read_shards(urls, expected: dict[str, int], problems: list[ReadProblem]):
    """Samples of each shard in turn. A shard that breaks (truncated, not a tar, gone) or ends
    short of its manifest count adds a problem naming it and the last sample read, and the stream
    goes on with the next shard."""
    for url in urls:
        last, count = None, 0
        try:
            for sample in tar_samples(url):  # not wds.tarfile_to_samples: see data/tarstream.py
                last, count = sample["__key__"], count + 1
                yield sample
        except (OSError, tarfile.TarError, ValueError) as err:  # give up on this shard only
            problems.append(ReadProblem(url, last, _reason(err), sample=False))
        else:
            if count < expected.get(url, 0):
                problems.append(ReadProblem(url, last, f"it ends after {count} of its {expected[url]} samples",
                                            sample=False))


def _decode_or_report(sample: dict, channels: int, problems: list[ReadProblem], audio: int | None = None) -> tuple | None:
    try:
        return _decode_sample(sample, channels, audio)
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
                raise UserError(f"{problem}; {self.hint.format(set=Path(problem.shard).parent)}")
            if problem not in self.warned:
                self.warned.add(problem)
                console.print(f"{self.prefix}[yellow]warning:[/yellow] {escape(str(problem))}; skipped "
                              "(data.on_error: skip)")
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


def _decode_sample(sample: dict, channels: int, audio: int | None = None) -> tuple:
    """(image or clip, label, key, json bytes, extra): ``extra`` holds the sound and per-stream
    labels (``data.audio.decode_extra``) when the sets have sound (``audio``: its samples)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is not None:
        image = transforms.decode(sample[key], channels)
    else:
        frames = sorted(k for k in sample if FRAME_KEY.match(k))
        if not frames:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
        image = torch.stack([transforms.decode(sample[k], channels) for k in frames])  # (T, C, H, W)
    if "cls" not in sample:
        raise ValueError("it has no cls (label) member")
    label = int(sample["cls"])
    # keys are unique within a set; the set's folder name makes them unique across sets. The json
    # member stays bytes until something reads it (``Batch.meta``).
    extra = decode_extra(sample, label, audio) if audio else {}
    return image, label, f"{_set_name(sample['__url__'])}/{sample['__key__']}", sample.get("json", b"{}"), extra


@functools.lru_cache(maxsize=4096)
def _set_name(url: str) -> str:
    """The folder of a shard (cached: a ``Path`` per sample costs more than the shard read)."""
    return Path(url).parent.name


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless seeded shard resampling, cut to ``batches_per_worker`` batches per epoch, yielded
    ``per_transfer`` batches at a time as one ``Batch`` (the loader splits them again)."""

    audio: int | None = None  # samples of each clip's sound when the sets have sound (``data.audio``)

    def __init__(self, urls, cfg: DataConfig, channels: int, rank: int, batches_per_worker: int, seed: int,
                 expected: dict[str, int] | None = None, per_transfer: int = 1):
        self.urls, self.cfg, self.channels, self.rank, self.seed = urls, cfg, channels, rank, seed
        self.expected = expected or {}  # url -> samples the manifest lists (to notice a truncated shard)
        self.missing: list[str] = []  # listed shards that were not there at the start (skipped)
        self.batches_per_worker, self.per_transfer = batches_per_worker, per_transfer
        self.transform = transforms.TrainAugment(cfg.resolution, cfg.augment)
        self.ring = HandOffRing(cfg.num_workers)
        self._epoch = multiprocessing.Value("i", 0)  # shared with persistent workers
        self._ahead: tuple[int, Iterator] | None = None  # (epoch, its groups, the first one made), in a worker

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

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
        epoch = self._epoch.value
        ahead, self._ahead = self._ahead, None
        groups = ahead[1] if ahead is not None and ahead[0] == epoch else self._groups(epoch)
        for items, problems in groups:
            yield self.ring.collate(items, problems)
        if get_worker_info() is not None and self.cfg.persistent_workers:  # it will run the next pass too
            self._ahead = (epoch + 1, _started(self._groups(epoch + 1)))

    def _groups(self, epoch: int) -> Iterator[tuple[list[tuple], list[ReadProblem]]]:
        """This worker's pass over ``epoch``: groups of ``per_transfer`` batches of augmented
        samples (fewer at the end), each with the problems met since the previous one."""
        worker, _ = _worker()
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        problems: list[ReadProblem] = []
        shards = (rng.choice(self.urls) for _ in iter(int, 1))
        size = self.cfg.batch_size
        group: list[tuple] = []
        left = self.batches_per_worker
        samples = _shuffled(_read_shards(shards, self.expected, problems), self.cfg.shuffle_buffer, rng,
                            lambda: left * size - len(group))
        for sample in samples:
            item = _decode_or_report(sample, self.channels, problems, self.audio)
            if problems and self.cfg.on_error == "raise":
                yield [], list(problems)
                return
            if item is None:
                continue
            group.append(item)
            if len(group) == min(self.per_transfer, left) * size:
                yield self._augment(group, epoch), list(problems)
                problems.clear()
                left -= len(group) // size
                group = []
                if not left:
                    return


def _started(groups: Iterator) -> Iterator:
    """``groups`` with its first item made now. A persistent worker makes the next epoch's first
    group at the end of a pass, while the training process still drains the groups prefetched
    from it; the next pass starts by handing it over (if that pass is for the epoch expected),
    so the workers do not all start decoding at once while the GPU waits (BENCHMARKS.md, gpu)."""
    first = next(groups, None)
    return itertools.chain([] if first is None else [first], groups)


def _shuffled(samples: Iterator[dict], buffer: int, rng: random.Random, wanted: Callable[[], int]) -> Iterator[dict]:
    """WebDataset's shuffle buffer (``wds.shuffle``: filled to half before the first draw, two
    reads per draw until full, then one), except that it stops reading once it holds as many
    samples as ``wanted()`` (the epoch's remaining need): ``wds.shuffle`` reads on, and each
    rank's every worker then read a buffer at each epoch's end that was never used."""
    held: list = []
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
    """Batches on ``device`` (None: the CPU). A missing shard is an error under ``data.on_error:
    raise``; under ``skip`` the others are used (with a warning) and the epoch shrinks by its samples."""
    listed = [shard for s in cfg.train for shard in listed_shards(s, cfg.train_split)]
    if not listed:
        raise UserError(f"no '{cfg.train_split}' shards in {cfg.train}; check data.train and data.train_split")
    missing = [path for path, _ in listed if not path.is_file()]
    if missing and (cfg.on_error == "raise" or len(missing) == len(listed)):
        raise missing_shard_error(missing[0])
    if missing and rank == 0:
        console.print(f"[yellow]warning:[/yellow] {len(missing)} of the {len(listed)} '{cfg.train_split}' shards "
                      f"listed in the manifests are missing, training on the others (data.on_error: skip): "
                      f"{escape(', '.join(map(str, missing)))}")
    expected = {str(path): int(entry.get("samples", 0)) for path, entry in listed if path.is_file()}
    urls = list(expected)
    samples = sum(split_count(load_manifest(s), cfg.train_split) for s in cfg.train)
    samples -= sum(int(entry.get("samples", 0)) for path, entry in listed if not path.is_file())
    workers = max(cfg.num_workers, 1)
    batches_per_rank = max(math.ceil(samples / (cfg.batch_size * world)), 1)
    per_worker = math.ceil(batches_per_rank / workers)
    frames = clip_frames(cfg.train)  # refuses sets whose samples cannot share a batch
    stream = TrainStream(urls, cfg, channels, rank, per_worker, seed, expected,
                         batches_per_transfer(cfg, channels, frames))
    stream.missing = [str(path) for path in missing]
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
                 frames: int | None = None, expected: dict[str, int] | None = None):
        self.urls, self.options, self.rank, self.world = urls, options, rank, world
        self.expected = expected or {}
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
            item = _decode_or_report(sample, self.options.channels, problems, self.audio)
            if problems:  # every sample counts: stop at the first problem (the loader raises)
                yield self.ring.collate([], problems)
                return
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
    expected = {str(path): int(entry.get("samples", 0)) for s in sets for path, entry in listed_shards(s, split)}
    stream = EvalStream(urls, options, rank, world, perturb, clip_frames(sets), expected)
    stream.audio = audio_samples(sets)
    workers = min(options.num_workers, max(len(urls) // world, 1))
    hint = ("evaluation reads every sample, so it stops; find what is wrong with deepfake-dist shards verify {set} "
            "and re-create the set")
    return ShardLoader(stream, transforms.Normalize(options.channels, options.normalize), "raise", hint, rank, world,
                       worker_nice=options.worker_nice, num_workers=workers)
