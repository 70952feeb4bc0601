"""Fault 6, bad configs: unknown keys, wrong types, non-finite numbers, negative sizes, missing
shard sets and shards, and combinations that cannot work. Each gives one ``error:`` line from the
CLI (exit 2) and starts no work: no run folder is created. Random configs are in
``test_config_fuzz.py``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from deepfake_dist.cli import main


def _base(shard_set, runs) -> dict:
    return {"name": "bad", "output_dir": str(runs), "model": {"name": "cnn", "width": 8},
            "data": {"train": [str(shard_set)], "resolution": 32, "batch_size": 8, "num_workers": 0},
            "train": {"max_steps": 1}, "wandb": {"mode": "disabled"}}


def _drop_shard(name: str):
    def damage(shard_set):
        (shard_set / name).unlink()
    return damage


def _empty_val_split(shard_set):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "val"]
    manifest["counts"]["val"] = {"real": 0, "fake": 0, "total": 0}
    (shard_set / "manifest.json").write_text(json.dumps(manifest))


# (id, YAML text appended to the base config or key=value overrides, damage to the shard set, expected parts)
CASES = [
    ("unknown top key", "trian:\n  epochs: 2\n", [], None, ["unknown key 'trian'", "did you mean 'train'"]),
    ("unknown key", "", ["data.batchsize=8"], None, ["'data.batchsize'", "did you mean 'batch_size'"]),
    ("unknown model key", "", ["model.widht=8"], None, ["'model.widht'", "did you mean 'width'"]),
    ("text for a model argument", "", ["model.width=big"], None, ["'model.width' expected an integer, got 'big'"]),
    ("model argument out of range", "", ["model.dropout=2"], None, ["model cnn cannot be built", "dropout"]),
    ("unknown model", "", ["model.name=resnet81"], None, ["model.name", "resnet18"]),
    ("text for an integer", "", ["data.batch_size=big"], None, ["'data.batch_size' expected an integer, got 'big'"]),
    ("list for an integer", "", ["train.epochs=[1]"], None, ["'train.epochs' expected an integer"]),
    ("text for a list", "", ["data.train=shards"], None, ["'data.train' expected a list"]),
    ("number for a text", "", ["name=2024"], None, ["'name' expected a string, got 2024; for the text, quote it"]),
    ("true for a number", "", ["optim.lr=true"], None, ["'optim.lr' expected a finite number"]),
    ("nan", "", ["optim.lr=.nan"], None, ["'optim.lr' expected a finite number, got nan"]),
    ("infinity", "", ["train.grad_clip=.inf"], None, ["'train.grad_clip' expected a finite number or null"]),
    ("not a choice", "", ["data.on_error=ignore"], None, ["'data.on_error' expected one of ['skip', 'raise']"]),
    ("not a choice 2", "", ["train.mixed_precision=fp8"], None, ["'train.mixed_precision'"]),
    ("section not a mapping", "", ["train=5"], None, ["'train' must be a mapping"]),
    ("zero batch", "", ["data.batch_size=0"], None, ["'data.batch_size' must be positive, got 0"]),
    ("negative resolution", "", ["data.resolution=-32"], None, ["'data.resolution' must be positive"]),
    ("negative workers", "", ["data.num_workers=-1"], None, ["'data.num_workers' must be >= 0"]),
    ("negative shuffle buffer", "", ["data.shuffle_buffer=-5"], None, ["'data.shuffle_buffer' must be >= 0"]),
    ("worker niceness out of range", "", ["data.worker_nice=25"], None,
     ["'data.worker_nice' is a niceness increment in 0..19, got 25"]),
    ("zero timeout", "", ["train.timeout_s=0"], None, ["'train.timeout_s' must be positive"]),
    ("zero max_nonfinite", "", ["train.max_nonfinite=0"], None, ["'train.max_nonfinite' must be positive"]),
    ("zero keep_last", "", ["checkpoint.keep_last=0"], None, ["'checkpoint.keep_last' must be positive"]),
    ("negative warmup", "", ["sched.warmup_steps=-1"], None, ["'sched.warmup_steps' must be >= 0"]),
    ("probability above 1", "", ["data.augment.hflip=2"], None, ["'data.augment.hflip' is a probability"]),
    ("missing shard set", "", ["data.train=[{tmp}/nowhere]"], None, ["nowhere' has no manifest.json"]),
    ("missing val set", "", ["data.val=[{tmp}/nowhere]"], None, ["nowhere' has no manifest.json"]),
    ("missing train shard, on_error raise", "", ["data.on_error=raise"], _drop_shard("train-000002.tar"),
     ["train-000002.tar is listed in", "but missing"]),
    ("missing val shard", "", [], _drop_shard("val-000000.tar"), ["val-000000.tar is listed in", "but missing"]),
    ("empty validation split", "", [], _empty_val_split, ["no 'val' shards in", "with a val split"]),
    ("no such split", "", ["data.train_split=training"], None, ["split 'training': expected one of train, val, test"]),
    ("resolution too small for the model", "", ["data.resolution=8"], None, ["model cnn cannot take 8x8 inputs"]),
    ("clip model on image sets", "", ["model={{name: temporal}}"], None, ["model.name temporal: it scores clips"]),
    ("monitor a metric the task does not report", "", ["train.monitor=val/accurcy"], None,
     ["'train.monitor' is 'val/accurcy', which a cnn run does not report (did you mean 'val/accuracy'?)"]),
    ("no such checkpoint", "", ["checkpoint.resume=/no/such/ckpt"], None, ["'checkpoint.resume'", "/no/such/ckpt"]),
    ("a key that is a number", "3: x\n", [], None, ["unknown key '3'"]),
    ("an override that is not YAML", "", ["train.epochs=[1"], None,
     ["(override 'train.epochs=[1'): the value is not valid YAML", "quote it"]),
    ("a tag that is not plain data", "", ["seed=!!python/object/apply:os.system [true]"], None,
     ["could not determine a constructor for the tag"]),
    ("an alias bomb", "", ["train.epochs=[&a [x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a], "
                           "&c [*b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c]]"], None,
     ["'train.epochs' expected an integer, got [['x', 'x', 'x', 'x', ...], [['x', 'x', 'x', 'x', ...], "]),
    ("a beta of 1", "", ["optim.betas=[0.9, 1]"], None, ["'optim.betas' is a pair of decay rates, each in [0, 1)"]),
    ("a negative momentum", "", ["optim.momentum=-0.5"], None, ["'optim.momentum' is a momentum in [0, 1)"]),
    ("a negative seed", "", ["seed=-1"], None, ["'seed' is a seed in 0..4294967295"]),
    ("a crop of nothing", "", ["data.augment.crop_scale=[0, 1]"], None, ["'data.augment.crop_scale' is the [smallest"]),
    ("crop scales out of order", "", ["data.augment.crop_scale=[1, 0.5]"], None, ["'data.augment.crop_scale'"]),
    ("a JPEG quality of 0", "", ["data.augment.jpeg_quality=[0, 90]"], None, ["'data.augment.jpeg_quality' is a"]),
    ("a jitter above 1", "", ["data.augment.jitter_strength=2"], None, ["'data.augment.jitter_strength' is a"]),
    ("a blur of 0", "", ["data.augment.blur_sigma=[0, 1]"], None, ["'data.augment.blur_sigma' is a"]),
    ("a negative lr floor", "", ["sched.min_lr_ratio=-1"], None, ["'sched.min_lr_ratio' is a fraction"]),
]

if not torch.cuda.is_available():  # Accelerate would drop fp16 on a CPU for fp32
    CASES.append(("fp16 on a CPU", "", ["train.mixed_precision=fp16"], None, ["fp16 mixed precision needs a GPU"]))


@pytest.mark.parametrize("text, overrides, damage, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_starts_no_work(text, overrides, damage, expected, shard_set, tmp_path, capsys):
    runs = tmp_path / "runs"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_base(shard_set, runs)) + text)
    if damage:
        damage(shard_set)
    line = _one_error_line(path, [o.format(tmp=tmp_path) for o in overrides], capsys)
    for part in expected:
        assert part in line
    assert not runs.exists()  # nothing started


def _one_error_line(config, overrides: list[str], capsys) -> str:
    """``deepfake-dist train`` exits 2 with exactly one ``error:`` line: return it."""
    assert main(["train", "--config", str(config), *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_an_fsdp_launch_is_one_line_pointing_to_zero3(shard_set, tmp_path, capsys, monkeypatch):
    """``accelerate launch --use_fsdp`` hands its ranks ACCELERATE_USE_FSDP=true."""
    runs = tmp_path / "runs"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_base(shard_set, runs)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = _one_error_line(path, [], capsys)
    assert "asks for FSDP" in line and "deepspeed_zero3.yaml" in line
    assert not runs.exists()


@pytest.mark.parametrize("args, expected", [
    (["--shard-size", "0"], "--shard-size 0: expected an integer >= 1"),
    (["--resolution", "4"], "--resolution 4: expected an integer >= 8"),
    (["--split", "0.5,0.5,0.5"], "--split 0.5,0.5,0.5: expected three fractions"),
    (["--quality", "0"], "--quality 0: expected an integer from 1 to 100"),
])
def test_bad_prepare_arguments_write_nothing(args, expected, tmp_path, capsys):
    from datasets import write_face_folder

    faces = write_face_folder(tmp_path / "faces", 2, 2)
    out = tmp_path / "out"
    assert main(["prepare", "--source", f"folder:{faces}", "--out", str(out), *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()
