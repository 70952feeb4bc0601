"""Fault 2, SIGKILL while a checkpoint is being written: the half-written ``.tmp-step-N`` folder is
never resumed from (it is removed), ``resume: auto`` takes the previous complete checkpoint, and
what was logged after that checkpoint is not in ``metrics.jsonl`` twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from inject import SMOKE

from deepfake_dist.config import load_config
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.train.checkpoint import FAULT_DELAY_ENV, STATE_FILE, checkpoint_dir, complete_checkpoints
from deepfake_dist.train.loop import train


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_previous(overrides, capsys):
    args = overrides + ["checkpoint.every_steps=2", "train.max_steps=6"]
    run_dir = load_config(SMOKE, args).run_dir
    half_written = checkpoint_dir(run_dir) / ".tmp-step-4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_DELAY_ENV: "1"}  # each write waits 1 s before its rename
    job = subprocess.Popen([sys.executable, "-m", "deepfake_dist", "train", "--config", str(SMOKE), *args],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (half_written / STATE_FILE).is_file():  # step 4 fully written, not yet published
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "the step-4 checkpoint was never written"
        time.sleep(0.02)
    job.kill()
    job.wait()
    metrics = run_dir / "metrics.jsonl"
    assert [r["step"] for r in read_jsonl(metrics)] == [2, 4]  # step 4 was logged before its checkpoint

    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2"]
    assert (half_written / "model.safetensors").is_file()  # it looks complete but for its name

    summary = train(load_config(SMOKE, args))
    err = "".join(capsys.readouterr().err.split())  # rich may wrap long lines
    assert f"removedthehalf-writtencheckpoint{half_written}" in err
    assert f"resumingfrom{checkpoint_dir(run_dir) / 'step-2'}(epoch0,step2)" in err
    assert summary["steps"] == 6
    assert not half_written.exists()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-4", "step-6"]
    assert [r["step"] for r in read_jsonl(metrics) if "train/loss" in r] == [2, 4, 6]  # each once
