"""Diffusion training (``ddpm``): noise prediction (epsilon) with MSE, DDPM's forward process.

Per batch: a timestep t ~ U{0, T-1} and noise e ~ N(0, I) per image (from the step's own random
generator, on the device), x_t = sqrt(a_t) x + sqrt(1 - a_t) e, loss = |e - net(x_t, t)|^2, then
one optimizer step (``engine.step.OptimizerStep``: accumulation, clipping, the schedule, the
NaN/inf skip) and an EMA update. The EMA network samples the grids and FID/KID (with
``diffusion.sampler`` in ``diffusion.sample_steps`` steps) and is exported as ``generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepfake_dist.ema import EMA
from deepfake_dist.engine.optim import build_optimizer, build_scheduler
from deepfake_dist.engine.runtime import plain_module
from deepfake_dist.engine.step import NONFINITE, OptimizerStep
from deepfake_dist.errors import UserError
from deepfake_dist.models.ddpm import require_diffusers
from deepfake_dist.tasks import TASKS
from deepfake_dist.tasks.generative import EXPORT_NAME, GenerativeTask, step_generator


@TASKS.register("diffusion")
class DiffusionTask(GenerativeTask):
    synthesis = "diffusion"

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        require_diffusers(f"{where}: model {cfg.model.name}")
        super().check_config(cfg, where)
        d = cfg.diffusion
        if not 0.0 <= d.ema_decay < 1.0:
            raise UserError(f"{where}: 'diffusion.ema_decay' must be in [0, 1), got {d.ema_decay}")
        timesteps = cfg.model.arg("num_train_timesteps")
        if not 1 <= d.sample_steps <= timesteps:
            raise UserError(f"{where}: 'diffusion.sample_steps' must be from 1 to the model's num_train_timesteps "
                            f"({timesteps}), got {d.sample_steps}")

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        model = self.on_device(cfg.model.build(**self.build_args))
        self.schedule = model.schedule
        # the EMA copy is taken before prepare: under ZeRO-3 the prepared weights are partitioned
        self.ema = EMA(model, cfg.diffusion.ema_decay)
        self.ema.averaged.to(accelerator.device)
        opt = build_optimizer(model.parameters(), cfg.optim)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.optimizer_step = OptimizerStep(accelerator, self.model, self.opt, cfg.train.grad_clip)
        self.batches = 0  # batches trained so far (checkpointed): seeds each batch's noise

    def set_total_steps(self, total_steps: int) -> None:
        super().set_total_steps(total_steps)
        self.optimizer_step.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def loss(self, images: Tensor, rng: torch.Generator) -> tuple[Tensor, dict]:
        images = images.float()
        noise = torch.randn(images.shape, generator=rng, device=rng.device).to(images.device)
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (images.shape[0],), generator=rng,
                          device=rng.device).to(images.device)
        predicted = self.model(self.schedule.add_noise(images, noise, t), t)
        return F.mse_loss(predicted.float(), noise), {}

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        acc = self.accelerator
        rng = step_generator((self.cfg.seed, "diffusion", acc.process_index, self.batches), acc.device)
        self.batches += 1
        logs = self.optimizer_step(lambda: self.loss(batch.image, rng))
        if NONFINITE not in logs and acc.sync_gradients:
            self.ema.update(plain_module(acc, self.model))
        return logs

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        size = self.cfg.data.resolution
        noise = torch.randn((n, self.channels, size, size), generator=generator, device=generator.device)
        return self.ema.module.sample(noise.to(self.accelerator.device), self.cfg.diffusion.sample_steps,
                                      self.cfg.diffusion.sampler)

    def export_modules(self) -> dict[str, torch.nn.Module]:
        return {EXPORT_NAME: self.ema.module}

    def replicated_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def export_info(self) -> dict:
        return {**super().export_info(), "sampler": self.cfg.diffusion.sampler,
                "sample_steps": self.cfg.diffusion.sample_steps}

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.ema.state_tensors(), "diffusion.batches": torch.tensor(self.batches)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.ema.load_state_tensors(tensors)
        self.batches = int(tensors.get("diffusion.batches", 0))
