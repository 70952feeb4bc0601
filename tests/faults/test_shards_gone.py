"""Fault: every training shard becomes unreadable (a shared filesystem or a store that goes away
mid-run). The training stream resamples shards for ever, so it would retry the bad ones for
ever, yielding nothing; instead it gives up: under ``data.on_error: raise`` at the first
unreadable shard, under ``skip`` once no shard could be read (or too many in a row), and the
trainer stops with a checkpoint and one line."""

from __future__ import annotations

import threading

import pytest
from inject import SMOKE, deadline

from deepfake_dist.config import DataConfig, load_config
from deepfake_dist.data.common import DataUnavailable
from deepfake_dist.data.loader import train_loader
from deepfake_dist.errors import UserError
from deepfake_dist.train.checkpoint import STATE_FILE, complete_checkpoints
from deepfake_dist.train.loop import train


def _unreadable(shard_set) -> list:
    shards = sorted(shard_set.glob("train-*.tar"))
    for shard in shards:
        shard.write_bytes(b"the filesystem is gone " * 64)
    return shards


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_the_loader_gives_up_when_no_shard_can_be_read(shard_set, on_error):
    shards = _unreadable(shard_set)
    cfg = DataConfig(train=[str(shard_set)], resolution=32, batch_size=8, num_workers=1, on_error=on_error)
    loader, stream = train_loader(cfg, 1, 0, 1, seed=0)
    stream.set_epoch(0)
    with deadline(60):
        if on_error == "skip":
            with pytest.raises(DataUnavailable, match=rf"none of the {len(shards)} training shards could be read "
                                                      r"\(the last: shard .* is unreadable from its start"):
                next(iter(loader))
        else:
            with pytest.raises(UserError, match=r"shard .*train-00000\d.tar is unreadable from its start .*"
                                                r"data.on_error is raise"):
                next(iter(loader))


def test_training_stops_with_a_checkpoint_when_its_shards_go(overrides, shard_set):
    cfg = load_config(SMOKE, overrides + ["train.epochs=50", "checkpoint.every_steps=2"])

    def pull_the_plug():
        while not complete_checkpoints(cfg.run_dir):
            threading.Event().wait(0.02)
        _unreadable(shard_set)

    threading.Thread(target=pull_the_plug, daemon=True).start()
    with deadline(120), pytest.raises(DataUnavailable) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert message.startswith("stopped: none of the 6 training shards could be read"), message
    saved = complete_checkpoints(cfg.run_dir)[-1]
    assert f"checkpoint written at {saved}" in message and (saved / STATE_FILE).is_file()
    assert int(saved.name.split("-")[1]) < 50 * 12  # long before the run's end
