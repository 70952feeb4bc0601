"""Fault 4, a non-finite loss: the batch is skipped on every rank (no optimizer update) and
counted as ``train/nonfinite_steps``; ``train.max_nonfinite`` in a row stop the run with a
checkpoint and one clear line. Overflowing gradients under fp16 are the GradScaler's business,
not a fault; without a scaler they are skipped like a NaN loss."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import probe_model  # noqa: F401 - registers the fault_probe model
import pytest
import torch
from inject import ROOT, SMOKE
from safetensors.torch import load_file

from deepfake_dist.config import OptimConfig, load_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.engine.optim import build_optimizer
from deepfake_dist.engine.runtime import make_accelerator
from deepfake_dist.engine.step import NONFINITE
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.errors import UserError
from deepfake_dist.tasks import create_task
from deepfake_dist.train.checkpoint import STATE_FILE, complete_checkpoints
from deepfake_dist.train.loop import train

PROBE = ["model.name=fault_probe", "train.log_every=1"]


def _optimizer_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    return int(state["state"][0]["step"])


def test_nonfinite_batches_are_skipped_and_counted(overrides):
    cfg = load_config(SMOKE, overrides + PROBE + ["model.nan_at=[3, 4]", "model.inf_grad_at=[6]",
                                                  "train.max_steps=8"])
    summary = train(cfg)
    assert summary["steps"] == 8 and summary["nonfinite steps"] == 3
    final = complete_checkpoints(cfg.run_dir)[-1]
    assert final.name == "step-8" and _optimizer_steps(final) == 5  # three updates never happened
    assert all(torch.isfinite(t).all() for t in load_file(str(final / "model.safetensors")).values())
    records = {r["step"]: r for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "train/lr" in r}
    assert [s for s, r in sorted(records.items()) if "train/loss" not in r] == [3, 4, 6]
    assert [records[s]["train/nonfinite_steps"] for s in (2, 3, 4, 5, 6, 8)] == [0, 1, 2, 2, 3, 3]


def test_a_run_of_nonfinite_losses_stops_with_a_checkpoint(overrides):
    cfg = load_config(SMOKE, overrides + PROBE + ["model.nan_at=[3, 4, 5, 6, 7, 8, 9, 10]", "train.max_nonfinite=3"])
    with pytest.raises(UserError) as info:
        train(cfg)
    message = str(info.value)
    saved = complete_checkpoints(cfg.run_dir)[-1]
    assert "\n" not in message and "NaN or inf in 3 batches in a row" in message
    assert "train.max_nonfinite is 3" in message and f"checkpoint written at {saved}" in message
    state = json.loads((saved / STATE_FILE).read_text())
    assert state["nonfinite_steps"] == 3 and state["batch"] == 5  # stopped at the third, batch 5
    assert _optimizer_steps(saved) == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(saved / "model.safetensors")).values())


def test_between_log_steps_a_run_of_skips_stops_the_run_at_the_next_one(overrides):
    """The skip is decided on the device and read at log steps only: the third NaN in a row
    (batch 5) stops the run at step 8, the next log step, with every skip counted."""
    cfg = load_config(SMOKE, overrides + PROBE + ["model.nan_at=[3, 4, 5, 6, 7, 8, 9, 10]", "train.max_nonfinite=3",
                                                  "train.log_every=4"])
    with pytest.raises(UserError, match="NaN or inf in 3 batches in a row"):
        train(cfg)
    saved = complete_checkpoints(cfg.run_dir)[-1]
    state = json.loads((saved / STATE_FILE).read_text())
    assert state["batch"] == 8 and state["nonfinite_steps"] == 6
    assert _optimizer_steps(saved) == 2  # none of the six reached the weights


def test_the_detector_step_leaves_its_skip_decision_on_the_device(overrides):
    """No ``.item()`` per step: the flag goes to the fused optimizer as ``found_inf`` and back to
    the loop as a tensor; a NaN batch changes no weight and no optimizer step count."""
    cfg = load_config(SMOKE, overrides)
    task = create_task(cfg, make_accelerator(cfg), channels=3)
    task.set_total_steps(4)
    assert task.opt.optimizer.defaults["fused"]
    batch = next(iter(eval_loader(cfg.data.train, "train", EvalOptions.from_data(cfg.data, 3))))
    weights = lambda: [p.detach().clone() for p in task.model.parameters()]  # noqa: E731
    before = weights()
    flag = task.train_step(dataclasses.replace(batch, image=torch.full_like(batch.image, float("nan"))))[NONFINITE]
    assert isinstance(flag, torch.Tensor) and flag.shape == () and flag.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, weights())), "a NaN batch changed the weights"
    assert all(int(s["step"]) == 0 for s in task.opt.optimizer.state.values())
    assert task.train_step(batch)[NONFINITE].item() == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, weights())), "a clean batch did not train"


def test_a_checkpoint_from_the_for_loop_optimizer_resumes_into_the_fused_one():
    """Optimizer state saved by torch's for-loop AdamW (a checkpoint from another deepfake_dist
    version): loading it must not switch this run back to that implementation, which refuses
    ``found_inf``."""
    model = torch.nn.Linear(4, 1)
    saved = build_optimizer(model.parameters(), OptimConfig())
    model(torch.randn(2, 4)).sum().backward()
    saved.step()
    opt = build_optimizer(model.parameters(), OptimConfig(), fused=True)
    opt.load_state_dict(saved.state_dict())
    assert all(group["fused"] for group in opt.param_groups)
    before = model.weight.detach().clone()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(model.weight, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA")
def test_fp16_overflow_is_left_to_the_grad_scaler(overrides):
    cfg = load_config(SMOKE, overrides + PROBE + ["model.inf_grad_at=[3]", "train.max_steps=6",
                                                  "train.mixed_precision=fp16"])
    summary = train(cfg)
    assert summary["nonfinite steps"] == 0  # the scaler skipped that step and lowered its scale
    assert _optimizer_steps(complete_checkpoints(cfg.run_dir)[-1]) <= 5


@pytest.mark.slow
def test_ranks_agree_to_skip_a_nan_met_by_one(overrides, tmp_path):
    """Only rank 1 sees a NaN; both skip the batch, so DDP neither hangs nor drifts apart."""
    from test_launch import accelerate_cmd, free_port

    cmd = accelerate_cmd("--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"),
                         "--main_process_port", str(free_port()), str(Path(__file__).parent / "probe_launch.py"),
                         "--config", str(SMOKE), *overrides, *PROBE, "model.nan_at=[3]", "model.rank=1",
                         "train.max_steps=5", "checkpoint.every_steps=null")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = load_config(SMOKE, overrides).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ranks agree"] and len(summary["rank_digests"]) == 2
    assert summary["nonfinite steps"] == 1
    assert _optimizer_steps(complete_checkpoints(run_dir)[-1]) == 4
