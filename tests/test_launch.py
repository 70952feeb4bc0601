"""A real two-process gloo run through ``accelerate launch``: it trains, the ranks end with
identical weights, metrics.jsonl and a wandb offline run exist, and a job killed with SIGKILL
after its first checkpoint resumes from it when relaunched with the same command."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scale_setup import free_port

from deepfake_dist.train.checkpoint import complete_checkpoints
from deepfake_dist.train.tracking import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def accelerate_cmd(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", *args]


@pytest.mark.slow
def test_two_process_gloo_run_killed_and_resumed(tmp_path, face_shards):
    runs = tmp_path / "runs"
    cmd = accelerate_cmd(
        "--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"), "--main_process_port", str(free_port()),
        str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/smoke.yaml"),
        f"data.train=[{face_shards}]", f"output_dir={runs}", "checkpoint.every_steps=2", "train.epochs=3",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    run_dir = runs / "smoke"

    job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not complete_checkpoints(run_dir):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, as when a node dies
    job.wait()
    first = complete_checkpoints(run_dir)[-1]

    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "resuming from" in out
    resumed_step = int(out.split("resuming from")[1].split("step ")[1].split(")")[0])
    assert resumed_step == int(first.name.split("-")[1])  # the last complete checkpoint

    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    assert len(summary["rank_digests"]) == 2 and summary["ranks agree"]
    assert summary["epochs"] == 3
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert any("val/auroc" in r for r in records)
    assert max(r["step"] for r in records) == summary["steps"]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[-1].iterdir())
