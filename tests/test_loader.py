"""The WebDataset loaders: equal batches per rank over uneven shards, deterministic streams,
augmentation that keeps shapes and ranges, and evaluation that reads every sample once."""

import collections
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import time

import pytest
import torch

from deepfake_dist.config import AugmentConfig, DataConfig
from deepfake_dist.data import transforms
from deepfake_dist.data.handoff import Batch
from deepfake_dist.data.loader import (
    EvalOptions,
    TrainStream,
    _seed,
    _shuffled,
    batches_per_transfer,
    eval_loader,
    resolve_channels,
    train_loader,
)
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.data.prepare import prepare
from deepfake_dist.data.tarstream import tar_samples
from deepfake_dist.errors import UserError
from deepfake_dist.options import PrepareOptions


def _data(sets, **kw) -> DataConfig:
    settings = dict(resolution=32, batch_size=4, num_workers=0, shuffle_buffer=16) | kw
    return DataConfig(train=[str(s) for s in sets], **settings)


def _batch_count(cfg, rank, world, epoch=0):
    loader, stream = train_loader(cfg, 1, rank, world, seed=0)
    stream.set_epoch(epoch)
    return sum(1 for _ in loader)


def test_ranks_get_equal_batches_over_uneven_shards(tmp_path, face_shards):
    from datasets import write_face_folder

    # a second set with a different number of shards and samples than face_shards
    folder = write_face_folder(tmp_path / "odd", 23, 0)
    odd = tmp_path / "odd_shards"
    prepare(PrepareOptions(source=f"folder:{folder}", out=odd, resolution=32, format="png", shard_size=7))
    shards = [s["samples"] for s in load_manifest(odd)["shards"] if s["split"] == "train"]
    assert len(set(shards)) > 1  # really uneven
    for workers in (0, 2):
        cfg = _data([face_shards, odd], num_workers=workers)
        counts = [_batch_count(cfg, rank, 3) for rank in range(3)]
        assert len(set(counts)) == 1 and counts[0] > 0
        samples = sum(split_count(load_manifest(s), "train") for s in (face_shards, odd))
        assert counts[0] * 4 * 3 >= samples  # an epoch covers at least the data once


def test_train_stream_is_deterministic_per_epoch_and_rank(face_shards):
    cfg = _data([face_shards])

    def keys(rank, epoch):
        loader, stream = train_loader(cfg, 1, rank, 2, seed=0)
        stream.set_epoch(epoch)
        return [(tuple(b.key), b.image.sum().item()) for b in loader]

    assert keys(0, 0) == keys(0, 0)  # same images, same augmentation
    assert keys(0, 0) != keys(1, 0)
    assert keys(0, 0) != keys(0, 1)


def test_workers_hand_over_groups_of_batches_that_train_as_the_same_batches(face_shards):
    one = _data([face_shards], num_workers=2, transfer_mib=0)
    grouped = _data([face_shards], num_workers=2, transfer_mib=0.012)  # 4 KiB batches: 3 a hand-off
    assert batches_per_transfer(one, 1, None) == 1 and batches_per_transfer(grouped, 1, None) == 3

    def batches(cfg):
        loader, stream = train_loader(cfg, 1, 0, 1, seed=0)
        assert stream.per_transfer == batches_per_transfer(cfg, 1, None)
        handed = [len(b) for b in stream]  # what a worker sends (here in this process)
        assert max(handed) == 4 * stream.per_transfer
        out = [(tuple(b.key), b.image.sum().item(), tuple(b.label.tolist())) for b in loader]
        assert len(out) == stream.batches_per_worker * 2
        return out

    ones, groups = batches(one), batches(grouped)
    assert all(len(keys) == 4 for keys, _, _ in groups)
    assert sorted(groups) == sorted(ones)  # the same batches, in another order of the two workers


def test_only_small_batches_are_grouped():
    faces = DataConfig(train=["x"], resolution=64, batch_size=32, num_workers=2)  # 384 KiB of uint8
    assert batches_per_transfer(faces, 3, None) == 21  # the default 8 MiB
    assert batches_per_transfer(DataConfig(train=["x"], resolution=224, batch_size=32), 3, None) == 1
    assert batches_per_transfer(faces, 3, 16) == 1  # 16-frame clips
    assert batches_per_transfer(DataConfig(train=["x"], resolution=64, num_workers=0), 3, None) == 1


def test_augmentation_keeps_shapes_and_ranges(face_shards):
    always = AugmentConfig(hflip=1.0, crop=1.0, jitter=1.0, jpeg=1.0, blur=1.0)
    cfg = _data([face_shards], augment=always, normalize="half")
    loader, _ = train_loader(cfg, 1, 0, 1, seed=0)
    batch = next(iter(loader))
    assert batch.image.shape == (4, 1, 32, 32) and batch.image.dtype == torch.float32
    assert batch.image.min() >= -1.0 and batch.image.max() <= 1.0
    plain = transforms.eval_resize(32)
    raw = transforms.decode(open_first_png(face_shards), 1)
    assert not torch.equal(transforms.TrainAugment(32, always)(raw), plain(raw))


def test_workers_hand_over_uint8_and_the_loader_normalizes_on_its_device(face_shards):
    cfg = _data([face_shards], normalize="half")
    loader, stream = train_loader(cfg, 1, 0, 1, seed=0, device=torch.device("cpu"))
    handed = next(iter(stream))  # what a worker hands over
    assert handed.image.dtype == torch.uint8
    batch = next(iter(loader))
    assert batch.image.dtype == torch.float32 and batch.image.device == torch.device("cpu")
    torch.testing.assert_close(batch.image, (handed.image.float() / 255 - 0.5) / 0.5)
    with pytest.raises(TypeError, match="uint8"):
        transforms.Normalize(1, "half")(batch.image)


def test_persistent_workers_start_the_next_epoch_ahead_and_it_changes_no_batch(face_shards, monkeypatch):
    """At the end of a pass a persistent worker makes the next epoch's first group, and the next
    pass hands it over if it is that epoch: each epoch's pass is made once, and every batch equals
    that of workers that never look ahead (fresh each epoch)."""
    made = multiprocessing.SimpleQueue()  # (worker pid, epoch) for each pass a worker starts
    groups = TrainStream._groups

    def recorded(self, epoch, *worker_and_skip):
        made.put((os.getpid(), epoch))
        return groups(self, epoch, *worker_and_skip)

    monkeypatch.setattr(TrainStream, "_groups", recorded)

    def batches(persistent):
        loader, stream = train_loader(_data([face_shards], num_workers=2, persistent_workers=persistent), 1, 0, 1,
                                      seed=0)
        out = []
        for epoch in (0, 1, 3):  # 2 is made ahead but never asked for
            stream.set_epoch(epoch)
            out.append([(b.key, b.image) for b in loader])
        return out

    ahead = batches(True)
    passes = collections.defaultdict(list)
    while not made.empty():
        pid, epoch = made.get()
        passes[pid].append(epoch)
    assert sorted(passes.values()) == [[0, 1, 2, 3, 4]] * 2
    fresh = batches(False)
    assert [[k for k, _ in epoch] for epoch in ahead] == [[k for k, _ in epoch] for epoch in fresh]
    assert all(torch.equal(a, b) for e, f in zip(ahead, fresh) for (_, a), (_, b) in zip(e, f))


def test_workers_run_nicer_than_the_training_process(face_shards):
    """``data.worker_nice``: the training and evaluation workers' niceness is the training
    process's plus that much (so busy workers cannot starve the process that drives the GPU)."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, make in itertools.product((0, 3), ("train", "eval")):
        cfg = _data([face_shards], num_workers=2, worker_nice=nice)
        before = set(multiprocessing.active_children())
        loader = train_loader(cfg, 1, 0, 1, seed=0)[0] if make == "train" else eval_loader(
            cfg.train, "train", EvalOptions.from_data(cfg, 1))
        batches = iter(loader)
        next(batches)  # the workers are running, but each sets its niceness as it starts: wait for the last
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
        deadline = time.monotonic() + 30
        while (seen := {os.getpriority(os.PRIO_PROCESS, w.pid) for w in workers}) != {min(mine + nice, 19)}:
            assert time.monotonic() < deadline, (nice, make, seen)
            time.sleep(0.05)
        del batches, loader


def test_separable_blur_matches_torchvisions_square_kernel():
    from torchvision.transforms.v2 import functional as TF

    image = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    for sigma in (0.3, 1.0, 2.5):
        size = 2 * math.ceil(3 * sigma) + 1
        expected = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        assert (transforms.gaussian_blur(image, sigma).int() - expected.int()).abs().max() <= 1


def open_first_png(shards):
    import tarfile

    with tarfile.open(next(shards.glob("train-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        return tar.extractfile(member).read()


def test_eval_reads_every_sample_once_across_ranks(face_shards):
    cfg = _data([face_shards])
    expected = split_count(load_manifest(face_shards), "val") + split_count(load_manifest(face_shards), "test")
    seen = []
    for rank in range(3):
        for split in ("val", "test"):
            for batch in eval_loader([str(face_shards)], split, EvalOptions.from_data(cfg, 1), rank, 3):
                seen += batch.key
                assert all("source" in m for m in batch.meta)
    assert len(seen) == len(set(seen)) == expected


def test_channels_follow_the_manifests(face_shards, tmp_path):
    assert resolve_channels(_data([face_shards]), [str(face_shards)]) == 1
    manifest = json.loads((face_shards / "manifest.json").read_text())
    assert manifest["channels"] == 1  # a grey folder stays grey end to end
    assert resolve_channels(_data([face_shards], channels=3), [str(face_shards)]) == 3


def test_the_shuffle_buffer_reads_no_more_than_the_epoch_needs():
    read = []
    source = (read.append(i) or i for i in itertools.count())
    taken: list[int] = []
    for sample in _shuffled(source, 100, random.Random(0), lambda: 250 - len(taken)):
        if not taken:
            assert len(read) == 50  # half the buffer before the first draw, as wds.shuffle
        taken.append(sample)
    assert len(taken) == 250 and sorted(taken) == read == list(range(250))  # nothing read and dropped
    assert taken != sorted(taken)
    assert taken[0] < 50  # drawn from what the buffer held


def test_the_heap_is_frozen_before_workers_fork_and_persistent_workers_fork_once(face_shards, monkeypatch):
    freezes = []
    monkeypatch.setattr(gc, "freeze", lambda freeze=gc.freeze: freezes.append(freeze()))
    loader, stream = train_loader(_data([face_shards], num_workers=1, persistent_workers=True), 1, 0, 1, seed=0)
    before = gc.get_freeze_count()
    assert len(list(loader)) > 0
    assert gc.get_freeze_count() > before  # what the training process holds is out of the collector's reach
    stream.set_epoch(1)
    assert len(list(loader)) > 0
    # counted by calls: the frozen count itself falls as frozen objects are freed
    assert len(freezes) == 1


def _expected_batch(images: dict, keys, epoch: int, cfg) -> torch.Tensor:
    """What the loader must deliver for ``keys``: each sample's bytes decoded, augmented with the
    generator seeded from (seed 0, epoch, key), and normalised."""
    augment, normalize = transforms.TrainAugment(cfg.resolution, cfg.augment), transforms.Normalize(1, cfg.normalize)
    out = []
    for key in keys:
        torch.default_generator.manual_seed(_seed(0, epoch, key))
        out.append(augment(transforms.decode(images[key], 1)))
    return normalize(torch.stack(out))


def test_workers_reuse_their_hand_off_buffers_and_every_batch_holds_its_samples(face_shards):
    cfg = _data([face_shards], num_workers=2, persistent_workers=True, transfer_mib=0)  # a hand-off per batch
    images = {f"{face_shards.name}/{s['__key__']}": s["png"]
              for shard in sorted(face_shards.glob("train-*.tar")) for s in tar_samples(str(shard))}
    loader, stream = train_loader(cfg, 1, 0, 1, seed=0)
    assert stream.batches_per_worker > stream.ring.slots  # each worker goes round its ring
    mapped = None
    for epoch in range(2):
        stream.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                torch.testing.assert_close(batch.image, _expected_batch(images, batch.key, epoch, cfg))
        # the training process holds each worker's buffers mapped, the same ones every epoch
        now = {slot: t.untyped_storage().data_ptr() for slot, t in stream.ring.mapped.items()}
        assert len(now) == 2 * stream.ring.slots
        assert mapped is None or now == mapped
        mapped = now


def test_a_worker_waits_for_the_training_process_to_free_a_hand_off_slot(face_shards):
    loader, stream = train_loader(_data([face_shards], num_workers=1, transfer_mib=0), 1, 0, 1, seed=0)
    handed = torch.utils.data.DataLoader.__iter__(loader)  # as the worker sends them; nothing is freed
    held = [next(handed) for _ in range(stream.ring.slots)]
    assert sorted(h.slot for h in held) == [(0, s) for s in range(stream.ring.slots)]
    first = held[0].image.clone()
    time.sleep(1)  # the worker has its next request: its next slot is held[0]'s, and busy
    assert torch.equal(held[0].image, first)
    stream.ring.done(held[0])
    after = next(handed)
    assert after.slot == held[0].slot and after.image.data_ptr() == held[0].image.data_ptr()
    assert not torch.equal(held[0].image, first)  # now refilled, as it may be
    for hand_off in held[1:]:  # so that the worker is not left waiting when the loader shuts down
        stream.ring.done(hand_off)


def test_a_buffer_crosses_to_the_training_process_once_then_hand_offs_name_its_slot(face_shards):
    cfg = _data([face_shards], num_workers=1, persistent_workers=True, transfer_mib=0)
    loader, stream = train_loader(cfg, 1, 0, 1, seed=0)
    sent, receive = [], stream.ring.received

    def received(slot, size, buffer, *rest):  # the training process's side of each hand-off, recorded
        sent.append(buffer is not None)
        return receive(slot, size, buffer, *rest)

    stream.ring.received = received
    for epoch in range(2):
        stream.set_epoch(epoch)
        assert sum(len(batch) for batch in loader) == stream.batches_per_worker * cfg.batch_size
    assert len(sent) == 2 * stream.batches_per_worker > stream.ring.slots
    assert sent[:stream.ring.slots] == [True] * stream.ring.slots and not any(sent[stream.ring.slots:])
    assert stream.ring.held.all()


def test_sample_json_is_parsed_when_read_and_bad_json_names_the_sample():
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["set/a", "set/b"], [b'{"source": "x"}', b"{}"])
    assert batch.meta == [{"source": "x"}, {}]
    assert [part.meta for part in batch.split(1)] == [[{"source": "x"}], [{}]]
    batch.meta_json[1] = b'{"source": '
    with pytest.raises(UserError, match="sample set/b: its json member is not valid JSON"):
        batch.meta
