"""A real two-process gloo run through ``accelerate launch``: it trains, the ranks end with
identical weights, metrics.jsonl and a wandb offline run exist, and a job killed with SIGKILL
after its first checkpoint resumes from it when relaunched with the same command. The same
launch with ``--dynamo_backend inductor`` (torch.compile) exports weights a plain model loads."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scale_setup import free_port

from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.models.exported import load_exported
from deepfake_dist.train.checkpoint import complete_checkpoints

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


@pytest.mark.slow
def test_compiled_two_process_run_exports_plain_weights_and_resumes(tmp_path, face_shards):
    """Accelerate's dynamo backend wraps the model in torch.compile, whose ``_orig_mod.`` must not
    reach the exported state dict: the export is the weights of the checkpoint at the best step,
    under the plain model's keys, and loads into it."""
    runs, inductor = tmp_path / "runs", tmp_path / "inductor"

    def launch(epochs: int) -> str:
        cmd = accelerate_cmd(
            "--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"), "--main_process_port", str(free_port()),
            "--dynamo_backend", "inductor", str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/smoke.yaml"),
            f"data.train=[{face_shards}]", f"output_dir={runs}", "checkpoint.every_steps=2", f"train.epochs={epochs}",
            "checkpoint.resume=auto", "wandb.mode=disabled")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    launch(epochs=1)
    run_dir = runs / "smoke"
    assert list(inductor.rglob("*.py")), "inductor generated no code: the model was not compiled"
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    assert summary["ranks agree"]
    model, _ = load_exported(run_dir)  # raises when the keys do not fit the plain model
    exported = load_file(str(run_dir / "model.safetensors"))
    at_best = load_file(str(run_dir / "checkpoints" / f"step-{summary['best step']}" / "model.safetensors"))
    assert exported.keys() == model.state_dict().keys() == at_best.keys()
    assert all(torch.equal(exported[k], at_best[k]) for k in exported)

    out = launch(epochs=2)
    assert int(out.split("resuming from")[1].split("step ")[1].split(")")[0]) == summary["steps"]
    assert __import__("json").loads((run_dir / "summary.json").read_text())["steps"] == 2 * summary["steps"]
