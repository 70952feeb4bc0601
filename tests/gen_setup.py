"""Tiny generator runs for the generator, synthesis and pipeline tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scale_setup import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny(shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> list[str]:
    """Overrides that make configs/dcgan.yaml or vae.yaml train in seconds on 32-px faces."""
    values = {"data.train": f"[{shards}]", "data.resolution": 32, "data.batch_size": 8, "data.num_workers": 0,
              "data.shuffle_buffer": 32, "train.max_steps": steps, "train.log_every": 1, "samples.every": 2,
              "samples.grid": 16, "samples.fid_every": 0, "output_dir": output_dir, "name": name,
              "wandb.mode": "disabled", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_gan(shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> list[str]:
    return tiny(shards, output_dir, name, steps, **{"model.ngf": 8, "model.ndf": 8, **extra})


GLOO = ["--config_file", str(CONFIGS / "accelerate" / "cpu_gloo.yaml")]
DEEPSPEED_ZERO2 = ["--use_deepspeed", "--zero_stage", "2", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(args: list[str], launcher: list[str] = GLOO, env: dict | None = None,
           timeout: int = 400) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two processes on this CPU (gloo by default; DeepSpeed needs
    ``DS_ACCELERATOR=cpu``, which is set), one thread each, from the repository root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
