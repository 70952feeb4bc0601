"""Fault 1, corrupt data: truncated shards, undecodable images and shards the manifest lists but
the disk lacks. Training skips them by default, warning once per problem (shard and key) and
counting them in the metrics; ``data.on_error: raise`` stops instead; evaluation always refuses,
since its numbers would silently change."""

from __future__ import annotations

import pytest
from inject import SMOKE, corrupt_image, truncate

from deepfake_dist.cli import main
from deepfake_dist.config import load_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.errors import UserError
from deepfake_dist.train.loop import train


def _damage_train_split(shard_set) -> dict:
    """Every train shard damaged, so whichever the resampler draws meets a problem: one missing,
    two cut short, three with an undecodable image."""
    shards = [shard_set / f"train-00000{i}.tar" for i in range(6)]
    shards[0].unlink()
    truncate(shards[1], 0.5)  # tar ends early without an error: noticed by the manifest count
    truncate(shards[2], 0.9)  # tar breaks inside a member: a read error
    keys = {shard: corrupt_image(shard, 2) for shard in shards[3:]}
    return {"missing": shards[0], "truncated": shards[1:3], "garbage": keys}


def test_training_skips_counts_and_warns_once(overrides, shard_set, capsys):
    damage = _damage_train_split(shard_set)
    # two epochs: the same damaged shards are drawn again, counted again, but not warned again
    cfg = load_config(SMOKE, overrides + ["train.epochs=2", "train.log_every=1", "checkpoint.every_steps=null"])
    summary = train(cfg)
    err = capsys.readouterr().err

    assert summary["epochs"] == 2 and summary["missing shards"] == [str(damage["missing"])]
    assert str(damage["missing"]) in err and "training on the others" in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:") and "skipped" in line]
    assert len(warnings) == len(set(warnings))  # once per problem
    for shard, key in damage["garbage"].items():
        assert sum(f"shard {shard}: sample {key} is unreadable" in w for w in warnings) <= 1
    met = [w for w in warnings if any(str(s) in w for s in damage["truncated"])]
    assert met and all("is unreadable" in w for w in met)
    assert any("(RuntimeError: Image is incomplete or truncated)" in w for w in warnings)

    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    last = [r for r in records if "train/skipped_samples" in r][-1]
    assert last["train/skipped_samples"] == summary["skipped samples"] > 0
    assert last["train/unreadable_shards"] == summary["unreadable shards"] > 0
    # each occurrence is counted, each distinct problem warned once
    assert summary["skipped samples"] + summary["unreadable shards"] > len(warnings)
    assert any("val/auroc" in r for r in records)  # validation ran on the intact val shard


def test_on_error_raise_stops_with_one_line(overrides, shard_set, capsys):
    keys = {str(shard): corrupt_image(shard, 0) for shard in sorted(shard_set.glob("train-*.tar"))}
    assert main(["train", "--config", str(SMOKE), *overrides, "data.on_error=raise"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert any(f"shard {shard}: sample {key} is unreadable" in lines[0] for shard, key in keys.items()), lines[0]
    assert "data.on_error is raise" in lines[0] and f"shards verify {shard_set}" in lines[0]


def test_missing_shard_at_start(overrides, shard_set, tmp_path):
    (shard_set / "train-000004.tar").unlink()
    with pytest.raises(UserError, match="train-000004.tar is listed in .*manifest.json but missing"):
        train(load_config(SMOKE, overrides + ["data.on_error=raise"]))
    for shard in shard_set.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(UserError, match="train-000000.tar is listed"):  # skip, but nothing left
        train(load_config(SMOKE, overrides))
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_validation_and_evaluation_refuse_missing_or_damaged_shards(overrides, shard_set, tmp_path):
    cfg = load_config(SMOKE, overrides)
    val = shard_set / "val-000000.tar"
    data = val.read_bytes()

    val.unlink()
    with pytest.raises(UserError, match="val-000000.tar is listed in .* but missing"):
        eval_loader([str(shard_set)], "val", EvalOptions.from_data(cfg.data, 1))
    with pytest.raises(UserError, match="val-000000.tar is listed"):  # training refuses it before it starts
        train(cfg)
    assert not (tmp_path / "runs").exists()

    val.write_bytes(data)
    key = corrupt_image(val, 1)
    with pytest.raises(UserError, match=f"sample {key} is unreadable.*evaluation reads every sample"):
        list(eval_loader([str(shard_set)], "val", EvalOptions.from_data(cfg.data, 1)))

    val.write_bytes(data)
    truncate(val, 0.5)
    with pytest.raises(UserError, match="val-000000.tar is unreadable after sample "):
        list(eval_loader([str(shard_set)], "val", EvalOptions.from_data(cfg.data, 1)))
