"""WebDataset loaders for training and evaluation.

Training resamples shards (as open_clip's ``--dataset-resampled``): each (rank, worker) draws
shards from all sets with its own seeded RNG and yields exactly ``batches_per_worker`` full
batches, so every rank sees the same number of batches per epoch whatever the shard sizes
(unequal counts hang DDP). The stream depends only on (seed, epoch, rank, worker) and each
sample's augmentation only on (seed, epoch, key), so a resumed run replays the same batches.

Evaluation reads every shard of the split exactly once: shards are split over ranks and
workers, nothing is resampled or dropped, and the caller gathers the predictions at the end.

A sample is one image (C, H, W) or, in a clip set (manifest ``frames``: K), a clip (K, C, H, W)
from its members ``f000.<fmt>``, ``f001.<fmt>``, ... in order. The transforms act on the whole
clip tensor, so every frame of a clip gets the same random crop, flip, jitter, JPEG and blur.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from deepfake_dist.config import DataConfig
from deepfake_dist.data import transforms
from deepfake_dist.data.manifest import load_manifest, shard_urls, split_count
from deepfake_dist.errors import UserError

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
FRAME_KEY = re.compile(r"^f\d{3}\.(jpg|png|jpeg|webp)$")  # a clip's frames: f000.png, f001.png, ...


@dataclass
class Batch:
    image: torch.Tensor
    label: torch.Tensor
    key: list[str]
    meta: list[dict]

    def to(self, device) -> "Batch":
        return Batch(self.image.to(device, non_blocking=True), self.label.to(device, non_blocking=True), self.key, self.meta)

    def __len__(self) -> int:
        return len(self.key)


def collate(samples: list[tuple]) -> Batch:
    images, labels, keys, metas = zip(*samples)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys), list(metas))


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


def _decode_sample(sample: dict, channels: int) -> tuple:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is not None:
        image = transforms.decode(sample[key], channels)
    else:
        frames = sorted(k for k in sample if FRAME_KEY.match(k))
        if not frames:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image")
        image = torch.stack([transforms.decode(sample[k], channels) for k in frames])  # (T, C, H, W)
    label = int(sample["cls"])
    meta = json.loads(sample["json"]) if "json" in sample else {}
    # keys are unique within a set; the set's folder name makes them unique across sets
    return image, label, f"{Path(sample['__url__']).parent.name}/{sample['__key__']}", meta


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless seeded shard resampling, cut to ``batches_per_worker`` batches per epoch."""

    def __init__(self, urls, cfg: DataConfig, channels: int, rank: int, batches_per_worker: int, seed: int):
        self.urls, self.cfg, self.channels, self.rank, self.seed = urls, cfg, channels, rank, seed
        self.batches_per_worker = batches_per_worker
        self.transform = transforms.train_transform(cfg.resolution, channels, cfg.normalize, cfg.augment)
        self._epoch = multiprocessing.Value("i", 0)  # shared with persistent workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def _augment(self, item: tuple, epoch: int) -> tuple:
        image, label, key, meta = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, epoch, key))
            return self.transform(image), label, key, meta

    def __iter__(self):
        epoch = self._epoch.value
        worker, _ = _worker()
        rng = random.Random(_seed(self.seed, epoch, self.rank, worker))
        shards = (dict(url=rng.choice(self.urls)) for _ in iter(int, 1))
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(shards)
        samples = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer // 2, rng=rng)(samples)
        batch: list[tuple] = []
        produced = 0
        for sample in samples:
            try:
                item = _decode_sample(sample, self.channels)
            except Exception as e:  # a corrupt image: skip it, the stream goes on
                wds.warn_and_continue(e)
                continue
            batch.append(self._augment(item, epoch))
            if len(batch) == self.cfg.batch_size:
                yield collate(batch)
                batch, produced = [], produced + 1
                if produced == self.batches_per_worker:
                    return


def train_loader(cfg: DataConfig, channels: int, rank: int, world: int, seed: int) -> tuple[torch.utils.data.DataLoader, TrainStream]:
    urls = [u for s in cfg.train for u in shard_urls(s, cfg.train_split)]
    if not urls:
        raise UserError(f"no '{cfg.train_split}' shards in {cfg.train}; check data.train and data.train_split")
    samples = sum(split_count(load_manifest(s), cfg.train_split) for s in cfg.train)
    clip_frames(cfg.train)  # refuses sets whose samples cannot share a batch
    workers = max(cfg.num_workers, 1)
    batches_per_rank = max(math.ceil(samples / (cfg.batch_size * world)), 1)
    per_worker = math.ceil(batches_per_rank / workers)
    stream = TrainStream(urls, cfg, channels, rank, per_worker, seed)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
    )
    return loader, stream


class EvalStream(IterableDataset):
    """Every sample of the split once: shards split over ranks then workers, last batch kept."""

    def __init__(self, urls, cfg: DataConfig, channels: int, rank: int, world: int, perturb=None,
                 frames: int | None = None):
        self.urls, self.cfg, self.channels, self.rank, self.world = urls, cfg, channels, rank, world
        self.transform = transforms.eval_transform(cfg.resolution, channels, cfg.normalize, perturb)
        self.sample_shape = (*([frames] if frames else []), channels, cfg.resolution, cfg.resolution)

    def __iter__(self):
        worker, workers = _worker()
        mine = self.urls[self.rank :: self.world][worker::workers]
        samples = wds.tarfile_to_samples(handler=wds.reraise_exception)(dict(url=u) for u in mine)
        batch = []
        for sample in samples:
            image, label, key, meta = _decode_sample(sample, self.channels)
            batch.append((self.transform(image), label, key, meta))
            if len(batch) == self.cfg.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def eval_loader(cfg: DataConfig, sets: list[str], split: str, channels: int, rank: int, world: int, perturb=None):
    """``perturb``: a picklable transform of the decoded uint8 image (see ``transforms.eval_transform``)."""
    urls = [u for s in sets for u in shard_urls(s, split)]
    if not urls:
        raise UserError(f"no '{split}' shards in {sets}; prepare the sets with a {split} split")
    stream = EvalStream(urls, cfg, channels, rank, world, perturb, clip_frames(sets))
    workers = min(cfg.num_workers, max(len(urls) // world, 1))
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
