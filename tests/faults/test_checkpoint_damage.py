"""Fault 3, a checkpoint truncated or tampered with after it was written: its sha256 no longer
matches ``checksums.json``, so ``resume: auto`` names the file and the checkpoint, falls back to
the previous complete one and says so; a damaged checkpoint named explicitly is refused."""

from __future__ import annotations

import shutil

import pytest
from inject import SMOKE, truncate

from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.train.checkpoint import CHECKSUMS_FILE, checkpoint_dir, checkpoint_problem
from deepfake_dist.train.loop import train


@pytest.fixture(scope="module")
def _trained(tmp_path_factory, face_shards):
    """A run with complete checkpoints at steps 2, 4 and 6 (trained once for the module)."""
    runs = tmp_path_factory.mktemp("damage") / "runs"
    args = [f"data.train=[{face_shards}]", "wandb.mode=disabled", "checkpoint.every_steps=2",
            "checkpoint.keep_last=3", "train.max_steps=6"]
    train(load_config(SMOKE, args + [f"output_dir={runs}"]))
    return args, runs


@pytest.fixture
def three_checkpoints(_trained, tmp_path):
    """A copy of that run to damage: (config overrides, its checkpoints folder)."""
    args, runs = _trained
    shutil.copytree(runs, tmp_path / "runs")
    args = args + [f"output_dir={tmp_path / 'runs'}"]
    folder = checkpoint_dir(load_config(SMOKE, args).run_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-6"]
    return args, folder


def _flip_a_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_auto_resume_falls_back_past_damaged_checkpoints(three_checkpoints, capsys):
    args, folder = three_checkpoints
    for ckpt in folder.iterdir():
        assert checkpoint_problem(ckpt) is None  # every file listed and matching
    truncate(folder / "step-6" / "model.safetensors")
    _flip_a_byte(folder / "step-4" / "optimizer.bin")  # same size, different bytes
    capsys.readouterr()

    summary = train(load_config(SMOKE, args + ["train.max_steps=8"]))
    err = "".join(capsys.readouterr().err.split())  # rich may wrap long lines
    for step, name in ((6, "model.safetensors"), (4, "optimizer.bin")):
        assert f"checkpoint{folder / f'step-{step}'}isdamaged:{name}doesnotmatchitssha256inchecksums.json" in err
    assert f"fallingbacktothepreviouscompletecheckpoint{folder / 'step-2'}" in err
    assert f"resumingfrom{folder / 'step-2'}(epoch0,step2)" in err
    assert summary["steps"] == 8
    assert checkpoint_problem(folder / "step-6") is None  # rewritten on the way to step 8


def test_damaged_checkpoint_named_explicitly_or_none_left(three_checkpoints):
    args, folder = three_checkpoints
    (folder / "step-6" / "scheduler.bin").unlink()
    with pytest.raises(UserError, match=r"step-6 is damaged: scheduler.bin is missing; choose another"):
        train(load_config(SMOKE, args + [f"checkpoint.resume={folder / 'step-6'}"]))

    (folder / "step-4" / CHECKSUMS_FILE).unlink()
    truncate(folder / "step-2" / "random_states_0.pkl")
    with pytest.raises(UserError) as info:
        train(load_config(SMOKE, args))
    message = str(info.value)
    assert "\n" not in message and f"no intact checkpoint to resume from in {folder}" in message
    assert "step-6: scheduler.bin is missing" in message and f"step-4: it has no {CHECKSUMS_FILE}" in message
    assert "step-2: random_states_0.pkl does not match its sha256" in message
    assert "checkpoint.resume: none" in message
