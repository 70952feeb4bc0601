"""Mid-epoch resume without replay: a loader started at batch B of an epoch yields exactly the
batches an uninterrupted pass yields from B (keys, labels and augmented pixels), for any number
of workers and hand-off sizes, and decodes none of the samples before B."""

import pytest
import torch

from deepfake_dist.config import DataConfig
from deepfake_dist.data import loader as loader_module
from deepfake_dist.data.loader import resume_plan, train_loader


def _data(sets, **kw) -> DataConfig:
    settings = dict(resolution=32, batch_size=4, num_workers=0, shuffle_buffer=16, transfer_mib=4 * 32 * 32 * 3 / 2**20)
    return DataConfig(train=[str(s) for s in sets], **(settings | kw))


def _pass(loader, stream, epoch, start=0):
    stream.set_epoch(epoch, start)
    return [(b.key, b.label.tolist(), b.image.clone()) for b in loader]


def test_resume_plan_follows_the_dataloaders_turns():
    # 2 workers, hand-offs of 3 batches, 7 batches each: w0 0-2, w1 3-5, w0 6-8, w1 9-11, w0 12, w1 13
    assert resume_plan(0, 2, 3, 7) == (0, [0, 0])
    assert resume_plan(4, 2, 3, 7) == (1, [3, 1])
    assert resume_plan(6, 2, 3, 7) == (0, [3, 3])
    assert resume_plan(13, 2, 3, 7) == (1, [7, 6])
    assert resume_plan(14, 2, 3, 7) == (0, [7, 7])  # the epoch's end: nothing left to make
    assert resume_plan(5, 1, 1, 9) == (0, [5])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_pass_yields_the_uninterrupted_batches_from_its_start(face_shards, workers):
    cfg = _data([face_shards], num_workers=workers)  # persistent workers: each pass also makes the next ahead
    loader, stream = train_loader(cfg, 1, 0, 1, seed=3)
    full = _pass(loader, stream, epoch=1)
    assert len(full) >= 8 and stream.per_transfer == (3 if workers else 1)
    for start in (1, 3, 4, len(full) - 1, len(full)):  # inside a hand-off, at one, the last batch, the end
        resumed = _pass(loader, stream, 1, start)
        assert [k for k, _, _ in resumed] == [k for k, _, _ in full[start:]], start
        assert [y for _, y, _ in resumed] == [y for _, y, _ in full[start:]]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(resumed, full[start:]))
    assert [k for k, _, _ in _pass(loader, stream, 2)] != [k for k, _, _ in full]  # the next epoch starts afresh


def test_the_skipped_samples_are_not_decoded(face_shards, monkeypatch):
    cfg = _data([face_shards])
    loader, stream = train_loader(cfg, 1, 0, 1, seed=0)
    decoded = []
    decode = loader_module.transforms.decode
    monkeypatch.setattr(loader_module.transforms, "decode", lambda data, channels: decoded.append(1) or decode(data, channels))
    full = _pass(loader, stream, 0)
    assert len(decoded) == len(full) * cfg.batch_size
    decoded.clear()
    start = len(full) - 2
    resumed = _pass(loader, stream, 0, start)
    assert len(decoded) == 2 * cfg.batch_size  # only the two batches it yields
    assert [k for k, _, _ in resumed] == [k for k, _, _ in full[start:]]
