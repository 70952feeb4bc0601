"""The training loop on real shards: it learns, checkpoints atomically, and a run killed after a
checkpoint resumes to exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepfake_dist.config import load_config
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.models.exported import load_exported
from deepfake_dist.train.checkpoint import complete_checkpoints
from deepfake_dist.train.loop import train
from deepfake_dist.train.state import RunState


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_loss_falls_and_best_model_is_exported(smoke_config, precision):
    """In fp32 and under bf16 autocast (on a CPU too), which keeps the weights, and so the
    export, in fp32."""
    path, overrides = smoke_config
    cfg = load_config(path, overrides + ["train.epochs=3", "train.log_every=1", "model.width=8",
                                         f"train.mixed_precision={precision}"])
    summary = train(cfg)
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    val = [r for r in records if "val/auroc" in r]
    assert len(val) == 3 and max(r["val/auroc"] for r in val) > 0.9
    assert summary["epochs"] == 3 and summary["ranks agree"]
    model, info = load_exported(cfg.run_dir)
    assert {t.dtype for t in load_file(str(cfg.run_dir / "model.safetensors")).values()} <= {torch.float32, torch.int64}
    assert info["threshold"] == 0.5 and info["build_args"] == {"in_channels": 1}
    assert info["val_metrics"]["auroc"] == summary["best val/auroc"]
    assert set(info["manifests"]) == {cfg.data.train[0]}
    assert (cfg.run_dir / "config.yaml").is_file()


def test_run_state_is_the_json_a_checkpoint_holds():
    state = RunState(epoch=2, step=40, batch=3, best=0.9, best_step=30, stale_epochs=1, skipped_samples=4,
                     unreadable_shards=1, nonfinite_steps=2, metrics_lines=25)
    saved = json.loads(json.dumps(state.state_dict()))
    assert list(saved) == ["epoch", "step", "batch", "best", "best_step", "stale_epochs", "skipped_samples",
                           "unreadable_shards", "nonfinite_steps", "metrics_lines"]  # trainer_state.json, as resume reads it
    loaded = RunState()
    loaded.load_state_dict(saved)
    assert loaded == state
    older = RunState()  # a state written before a counter existed starts that counter at 0
    older.load_state_dict({k: v for k, v in saved.items() if k != "nonfinite_steps"})
    assert older.step == 40 and older.nonfinite_steps == 0


def test_half_written_checkpoints_are_ignored(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step-4").mkdir(parents=True)
    (folder / "step-4" / "trainer_state.json").write_text("{}")
    (folder / ".tmp-step-8").mkdir()  # killed while writing
    (folder / "step-12").mkdir()  # no state file: never published by us
    assert complete_checkpoints(tmp_path) == [folder / "step-4"]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _kill_after_first_checkpoint(proc, run_dir: Path, timeout=120):
    deadline = time.monotonic() + timeout
    while not complete_checkpoints(run_dir):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _final_weights(run_dir: Path) -> dict:
    last = complete_checkpoints(run_dir)[-1]
    return load_file(str(last / "model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_ends_with_same_weights(smoke_config):
    path, overrides = smoke_config
    base = [sys.executable, "-m", "deepfake_dist", "train", "--config", str(path), *overrides,
            "checkpoint.every_steps=3", "train.epochs=2"]
    full = _run(base + ["name=full"])
    assert full.wait(timeout=300) == 0, full.stdout.read()

    broken = _run(base + ["name=broken"])
    run_dir = Path(overrides[1].split("=", 1)[1]) / "broken"
    _kill_after_first_checkpoint(broken, run_dir)
    assert broken.returncode == -signal.SIGKILL
    resumed = _run(base + ["name=broken"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from" in out

    a, b = _final_weights(run_dir.parent / "full"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_gradient_accumulation_and_early_stopping(smoke_config):
    path, overrides = smoke_config
    plain = train(load_config(path, overrides + ["name=plain", "train.epochs=1"]))
    accum = train(load_config(path, overrides + ["name=accum", "train.epochs=1", "train.grad_accum=2"]))
    assert accum["steps"] * 2 == plain["steps"]  # one optimizer step per two batches

    # the monitored metric can never improve on its first value: stop after 1 stale epoch
    cfg = load_config(path, overrides + ["name=early", "train.epochs=5", "train.monitor=val/samples",
                                         "train.early_stopping=1"])
    stopped = train(cfg)
    assert stopped["early stopped"] and stopped["epochs"] == 2


def test_channels_last_only_on_a_gpu_without_deepspeed():
    from deepfake_dist.tasks import memory_format

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert memory_format(True, cuda, deepspeed=False) == torch.channels_last
    assert memory_format(False, cuda, deepspeed=False) == torch.contiguous_format  # train.channels_last: false
    assert memory_format(True, cpu, deepspeed=False) == torch.contiguous_format
    assert memory_format(True, cuda, deepspeed=True) == torch.contiguous_format
