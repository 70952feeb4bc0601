"""What the generator tasks (GANs, autoencoders, diffusion) share: fixed-noise sample grids, FID/KID,
export info, each step's own random generator.

A generator run writes ``runs/NAME/samples/step-NNNNNN.png`` every ``samples.every`` steps and
at the last step (also logged to wandb), and reports FID/KID against the held-out real split
at validation every ``samples.fid_every`` epochs when the Inception weights are on disk.
It exports ``generator.safetensors`` + ``generator.json``, which ``deepfake-dist generate`` reads.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from deepfake_dist.atomic import atomic_path
from deepfake_dist.console import console
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.engine.runtime import broadcast_buffers
from deepfake_dist.errors import UserError, out_of_space_is_one_line
from deepfake_dist.evaluation.fidelity import Fidelity, find_inception_weights, inception, to_uint8_rgb
from deepfake_dist.tasks import Task

EXPORT_NAME = "generator"


def step_generator(key: tuple, device: torch.device | str) -> torch.Generator:
    """A random generator of one training step's own, seeded by ``key`` (seed, task, rank, step):
    ranks draw different noise, and a resumed run draws what the uninterrupted one did (the global
    RNG is also used by the data loader). On ``device``, so a GPU draws its noise where it uses it."""
    return torch.Generator(device).manual_seed(zlib.crc32(repr(key).encode()))


class GenerativeTask(Task):
    """Subclasses build their models and implement ``train_step`` and ``sample``."""

    metrics = ("fid", "kid", "kid_std", "fid_real", "fid_fake")  # with the Inception weights (``evaluation.fidelity``)
    # how ``deepfake-dist generate`` turns the exported generator into images (``generate.SYNTHESIZERS``)
    synthesis = "latent"

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        """Generators work in [-1, 1], at the shards' size, on real faces only."""
        super().check_config(cfg, where)
        if cfg.data.normalize != "half":
            raise UserError(f"{where}: generators output [-1, 1]; set data.normalize: half (got {cfg.data.normalize})")
        for key in ("resolution", "channels"):
            if key in cfg.model.args:
                raise UserError(f"{where}: remove model.{key}; a generator takes data.{key} (the shards' own)")
        fakes = {s: split_count(load_manifest(s), cfg.data.train_split, "fake") for s in cfg.data.train}
        if any(fakes.values()):
            bad = next(s for s, n in fakes.items() if n)
            raise UserError(f"{where}: data.train set {bad} holds {fakes[bad]} fake '{cfg.data.train_split}' images; "
                            "generators learn from real faces only: list real shard sets in data.train")

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        self.build_args = {"resolution": cfg.data.resolution, "channels": channels}
        self.samples_dir = Path(cfg.run_dir) / "samples"
        self.total_steps = 0
        self.epochs_validated = 0
        self.inception_path, missing = find_inception_weights(cfg.samples.inception_weights)
        if missing and cfg.samples.fid_every and accelerator.is_main_process:
            console.print(missing, soft_wrap=True)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def broadcast_buffers(self, *models) -> None:
        """Rank 0's BatchNorm statistics on every rank now, before the EMA reads them (the loop
        does it again after the step, for every task)."""
        broadcast_buffers(self.accelerator, models)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images in [-1, 1] from the model used for synthesis (no grad, eval mode)."""
        raise NotImplementedError

    def after_step(self, step: int, tracker) -> None:
        every = self.cfg.samples.every
        if every and (step % every == 0 or step == self.total_steps):
            self.save_grid(step)

    def save_grid(self, step: int) -> Path:
        """The same noise every time (seeded by ``seed``), so grids show progress, not luck.
        Every rank samples (a ZeRO-3 forward is collective); the main process writes."""
        images = self.sample(self.cfg.samples.grid, torch.Generator().manual_seed(self.cfg.seed))
        path = self.samples_dir / f"step-{step:06d}.png"
        if self.accelerator.is_main_process:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            grid = make_grid(images.float().cpu(), nrow=math.ceil(math.sqrt(len(images))), normalize=True,
                             value_range=(-1, 1))
            with out_of_space_is_one_line(f"the sample grid {path}", self.samples_dir), atomic_path(path) as tmp:
                save_image(grid[: self.channels], tmp)  # a grey model's grid stays grey
            if self.cfg.wandb.mode != "disabled":
                import wandb

                self.accelerator.log({"samples": wandb.Image(str(path), caption=f"step {step}")}, step=step)
        return path

    def fidelity(self, extractor=None) -> dict[str, float]:
        """FID/KID of ``samples.fid_samples`` generated images against up to as many held-out
        real ones (``data.val_split`` of the validation sets), every rank taking a share."""
        cfg, acc = self.cfg, self.accelerator
        if extractor is None:
            if self.inception_path is None:
                return {}
            extractor = inception(self.inception_path)
        world, rank = acc.num_processes, acc.process_index
        metric = Fidelity(extractor, acc.device)
        sets = cfg.data.val or cfg.data.train
        # every rank reads the split and keeps every world-th image, so none is left without data
        seen = 0
        for batch in self.val_loader(whole=True):
            mine = [i for i in range(len(batch)) if (seen + i) % world == rank and seen + i < cfg.samples.fid_samples]
            seen += len(batch)
            if mine:
                metric.update(to_uint8_rgb(batch.image[mine]), real=True)
            if seen >= cfg.samples.fid_samples:
                break
        if min(seen, cfg.samples.fid_samples) < 2 * world:
            if acc.is_main_process:
                console.print(f"FID/KID skipped: only {seen} '{cfg.data.val_split}' images in {sets}")
            return {}
        share = len(range(rank, cfg.samples.fid_samples, world))
        noise = torch.Generator().manual_seed(cfg.seed + 1 + rank)
        for start in range(0, share, cfg.data.batch_size):
            images = self.sample(min(cfg.data.batch_size, share - start), noise)
            metric.update(to_uint8_rgb(images), real=False)
        return metric.compute(acc)

    def validate(self) -> dict[str, float]:
        self.epochs_validated += 1
        every = self.cfg.samples.fid_every
        if every and self.epochs_validated % every == 0:
            return self.fidelity()
        return {}

    def export_info(self) -> dict:
        return {"kind": "generator", "synthesis": self.synthesis, "build_args": self.build_args,
                "channels": self.channels}
