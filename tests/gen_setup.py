"""Tiny generator runs for the generator, synthesis and pipeline tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from scale_setup import free_port

from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.imageio import decode
from deepfake_dist.data.manifest import load_manifest, shard_urls, verify

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny_settings(shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> dict:
    """Config values that make a generator's config (configs/dcgan.yaml, vae.yaml, ...) train in
    seconds on 32-px faces (a pipeline's ``set``)."""
    return {"data.train": [str(shards)], "data.resolution": 32, "data.batch_size": 8, "data.num_workers": 0,
            "data.shuffle_buffer": 32, "train.max_steps": steps, "train.log_every": 1, "samples.every": 2,
            "samples.grid": 16, "samples.fid_every": 0, "output_dir": str(output_dir), "name": name,
            "wandb.mode": "disabled", **extra}


def tiny(shards: Path, output_dir: Path, name: str, steps: int = 4, **extra) -> list[str]:
    """``tiny_settings`` as command-line overrides (values in JSON, which YAML reads)."""
    return [f"{k}={json.dumps(v)}" for k, v in tiny_settings(shards, output_dir, name, steps, **extra).items()]


# Per generator config (configs/NAME.yaml): the smallest networks that still exercise every part
# (StyleGAN2: R1, path length and style mixing every other step, its DiffAugment; DDPM: attention).
TINY = {
    "dcgan": {"model.ngf": 8, "model.ndf": 8},
    "cdcgan": {"model.ngf": 8, "model.ndf": 8},
    "vae": {"model.width": 8, "model.latent_dim": 16},
    "stylegan2": {"model.z_dim": 32, "model.w_dim": 32, "model.mapping_layers": 2, "model.channel_base": 128,
                  "model.channel_max": 16, "stylegan2.r1_every": 2, "stylegan2.pl_weight": 2, "stylegan2.pl_every": 2,
                  "stylegan2.style_mixing": 0.9},
    "ddpm": {"model.width": 8, "model.channel_mult": [1, 2], "model.attention_resolutions": [16],
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


def read_set(set_dir) -> dict[str, tuple]:
    """key -> (split, cls, json, pixels) for every sample of every split; duplicates fail."""
    samples = {}
    for split in SPLITS:
        urls = shard_urls(set_dir, split)
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False) if urls else []:
            assert s["__key__"] not in samples, f"duplicate key {s['__key__']}"
            samples[s["__key__"]] = (split, int(s["cls"]), json.loads(s["json"]), np.asarray(decode(s["png"])))
    return samples


def assert_one_rank_and_two_agree(one: Path, two: Path, n: int) -> None:
    """The fake set ``two`` ranks wrote holds what one rank wrote in ``one``: the same ``n`` keys,
    splits and metadata, pixels within 1 (batches of another size may round differently)."""
    assert verify(two) == [] and load_manifest(two)["created"]["world_size"] == 2
    a, b = read_set(one), read_set(two)
    assert set(b) == set(a) and len(b) == n  # no duplicates, no gaps
    for key in a:
        assert a[key][:3] == b[key][:3]
        assert np.abs(a[key][3].astype(int) - b[key][3].astype(int)).max() <= 1, key
