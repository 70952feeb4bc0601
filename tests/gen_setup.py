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
    """Overrides that make a generator's config (configs/dcgan.yaml, vae.yaml, ...) train in seconds
    on 32-px faces."""
    values = {"data.train": f"[{shards}]", "data.resolution": 32, "data.batch_size": 8, "data.num_workers": 0,
              "data.shuffle_buffer": 32, "train.max_steps": steps, "train.log_every": 1, "samples.every": 2,
              "samples.grid": 16, "samples.fid_every": 0, "output_dir": output_dir, "name": name,
              "wandb.mode": "disabled", **extra}
    return [f"{k}={v}" for k, v in values.items()]


# Per generator config (configs/NAME.yaml): the smallest networks that still exercise every part
# (StyleGAN2: R1, path length and style mixing every other step, its DiffAugment; DDPM: attention).
TINY = {
    "dcgan": {"model.ngf": 8, "model.ndf": 8},
    "cdcgan": {"model.ngf": 8, "model.ndf": 8},
    "vae": {"model.width": 8, "model.latent_dim": 16},
    "stylegan2": {"model.z_dim": 32, "model.w_dim": 32, "model.mapping_layers": 2, "model.channel_base": 128,
                  "model.channel_max": 16, "stylegan2.r1_every": 2, "stylegan2.pl_weight": 2, "stylegan2.pl_every": 2,
                  "stylegan2.style_mixing": 0.9},
    "ddpm": {"model.width": 8, "model.channel_mult": "[1, 2]", "model.attention_resolutions": "[16]",
             "model.layers_per_block": 1, "diffusion.sample_steps": 3},
}
GENERATORS = ["dcgan", "stylegan2", "ddpm"]  # what the training, resume and synthesis tests run


def tiny_generator(model: str, shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> list[str]:
    """``tiny`` with configs/MODEL.yaml's networks shrunk (``TINY``)."""
    return tiny(shards, output_dir, name, steps, **{**TINY[model], **extra})


def tiny_gan(shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> list[str]:
    return tiny_generator("dcgan", shards, output_dir, name, steps, **extra)


GLOO = ["--config_file", str(CONFIGS / "accelerate" / "cpu_gloo.yaml")]


def deepspeed_zero2(precision: str = "no") -> list[str]:
    """``accelerate launch`` flags for DeepSpeed ZeRO-2 on two processes, in ``precision``."""
    return ["--use_deepspeed", "--zero_stage", "2", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", precision, "--dynamo_backend", "no"]


def launch(args: list[str], launcher: list[str] = GLOO, env: dict | None = None,
           timeout: int = 400) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two processes on this CPU (gloo by default; DeepSpeed needs
    ``DS_ACCELERATOR=cpu``, which is set), one thread each, from the repository root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
