"""Resuming after an interruption ends with what an uninterrupted run would have had: a stop
signal at the last step, or a kill during the final validation, still gets the validation, the
exported model and the final checkpoint; ``metrics.jsonl`` holds each record once; checkpoints
newer than an explicit resume point are moved aside, never resumed from later."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import probe_model  # noqa: F401 - registers the fault_probe model
import pytest
from accelerate.state import AcceleratorState, GradientState
from inject import SMOKE
from safetensors.torch import load_file

from deepfake_dist.config import load_config
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.train.checkpoint import STATE_FILE, checkpoint_dir, complete_checkpoints
from deepfake_dist.train.loop import train

PROBE = ["model.name=fault_probe", "train.max_steps=6"]


def _records(run_dir: Path) -> list[tuple[int, str]]:
    """(step, kind) of every record of metrics.jsonl, kind ``train`` or ``val``."""
    return [(r["step"], "val" if any(k.startswith("val/") for k in r) else "train")
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def _assert_ended_as(run_dir: Path, reference: Path) -> None:
    """The run's end is the reference run's: the same validation, export and final checkpoint."""
    assert _records(run_dir) == _records(reference)
    final = complete_checkpoints(run_dir)[-1]
    assert final.name == "step-6"
    state = json.loads((final / STATE_FILE).read_text())
    assert (state["epoch"], state["batch"], state["best_step"]) == (1, 0, 6)  # the epoch's end is done
    exported, expected = load_file(str(run_dir / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert exported.keys() == expected.keys() and all((exported[k] == expected[k]).all() for k in expected)
    assert json.loads((run_dir / "model.json").read_text())["val_metrics"] == \
        json.loads((reference / "model.json").read_text())["val_metrics"]


@pytest.fixture(scope="module")
def reference(face_shards, tmp_path_factory) -> Path:
    """The run's folder as the uninterrupted run leaves it (on the same shards: their copy's path
    changes neither the batches nor the augmentation)."""
    runs = tmp_path_factory.mktemp("reference")
    cfg = load_config(SMOKE, [f"data.train=[{face_shards}]", f"output_dir={runs}", "wandb.mode=disabled", *PROBE])
    assert train(cfg)["steps"] == 6
    AcceleratorState._reset_state(True)  # as after every test (conftest), for the test that follows
    GradientState._reset_state()
    return cfg.run_dir


def test_a_stop_signal_at_the_last_step_still_ends_with_validation_export_and_checkpoint(overrides, reference):
    args = overrides + PROBE + ["model.stop_at=[6]"]  # SIGTERM during the last step
    cfg = load_config(SMOKE, args)
    assert train(cfg)["stopped"]
    assert not (cfg.run_dir / "model.safetensors").exists()  # stopped before its validation
    summary = train(load_config(SMOKE, args))
    assert "stopped" not in summary and summary["steps"] == 6 and summary["best step"] == 6
    _assert_ended_as(cfg.run_dir, reference)


@pytest.mark.slow
def test_a_kill_during_the_final_validation_still_ends_with_it(overrides, reference, tmp_path):
    """The last step's ``every_steps`` checkpoint is written, then the job is killed (SIGKILL) in
    the validation that follows; the rerun validates, exports and checkpoints."""
    args = overrides + PROBE + ["checkpoint.every_steps=3"]
    probe = Path(__file__).parent / "probe_launch.py"
    killed = subprocess.run([sys.executable, str(probe), "--config", str(SMOKE), *args, "model.kill_eval_at=[2]"],
                            capture_output=True, text=True, timeout=300)  # as many threads as the reference
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run_dir = load_config(SMOKE, args).run_dir
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-3", "step-6"]
    assert not (run_dir / "model.safetensors").exists()
    summary = train(load_config(SMOKE, args))
    assert summary["steps"] == 6 and summary["best step"] == 6
    _assert_ended_as(run_dir, reference)


def test_checkpoints_newer_than_an_explicit_resume_point_are_moved_aside(overrides, capsys):
    args = overrides + ["checkpoint.every_steps=2", "checkpoint.keep_last=3", "train.max_steps=6"]
    cfg = load_config(SMOKE, args)
    train(cfg)
    folder = checkpoint_dir(cfg.run_dir)
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-2", "step-4", "step-6"]

    capsys.readouterr()
    train(load_config(SMOKE, args + [f"checkpoint.resume={folder / 'step-2'}", "train.max_steps=4",
                                     "checkpoint.keep_last=1"]))
    err = " ".join(capsys.readouterr().err.split())
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-4"]  # the others were not this run's future
    aside = [p for p in folder.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-4", "step-6"]
    assert f"moved the checkpoints newer than step 2 (step-4, step-6) aside to {aside[0]}" in err

    capsys.readouterr()
    assert train(load_config(SMOKE, args))["steps"] == 6  # auto resumes this run's step-4, not step-6
    assert f"resuming from {folder / 'step-4'}" in " ".join(capsys.readouterr().err.split())
