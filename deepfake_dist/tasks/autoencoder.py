"""Autoencoder / VAE training (``ae``, ``vae``): reconstruction + KL with a linear warm-up.

The KL weight ramps from 0 to ``vae.kl_weight`` over ``vae.kl_warmup_steps`` optimizer steps
(so the decoder learns to reconstruct before the prior pulls the codes together); the step
count is checkpointed with the run. Validation reports the reconstruction loss on the held-out
real split (``train.monitor: val/recon``, mode min) and FID/KID when available. The whole model
is exported as ``generator`` (sampling decodes prior draws; the AE also needs its code moments).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepfake_dist.engine.optim import build_optimizer, build_scheduler
from deepfake_dist.engine.runtime import plain_module
from deepfake_dist.engine.step import NONFINITE, OptimizerStep
from deepfake_dist.models.autoencoder import RECON_LOSSES, vae_loss
from deepfake_dist.tasks import TASKS
from deepfake_dist.tasks.generative import EXPORT_NAME, GenerativeTask


@TASKS.register("autoencoder")
class AutoEncoderTask(GenerativeTask):
    metrics = ("recon", "samples", *GenerativeTask.metrics)

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        model = self.on_device(cfg.model.build(**self.build_args))
        opt = build_optimizer(model.parameters(), cfg.optim)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.optimizer_step = OptimizerStep(accelerator, self.model, self.opt, cfg.train.grad_clip)
        self.step = 0  # optimizer steps so far (checkpointed): the KL warm-up's clock

    def set_total_steps(self, total_steps: int) -> None:
        super().set_total_steps(total_steps)
        self.optimizer_step.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def kl_weight(self) -> float:
        warmup = self.cfg.vae.kl_warmup_steps
        return self.cfg.vae.kl_weight * (min(self.step / warmup, 1.0) if warmup else 1.0)

    def loss(self, batch, kl_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
        out = {k: v.float() if v is not None else None for k, v in self.model(batch.image).items()}
        losses = vae_loss(out, batch.image.float(), kl_weight, self.cfg.vae.recon)
        return losses.pop("loss"), {k: v.detach() for k, v in losses.items()}

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        kl_weight = self.kl_weight()
        logs = self.optimizer_step(lambda: self.loss(batch, kl_weight))
        if NONFINITE in logs:  # skipped on every rank, counted by the trainer
            return logs
        if self.accelerator.sync_gradients:
            self.step += 1
            self.broadcast_buffers(self.model)
        return {**logs, "kl_weight": kl_weight}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean per-image reconstruction loss over the whole held-out split, summed over ranks."""
        cfg, acc = self.cfg, self.accelerator
        model = plain_module(acc, self.model).eval()  # no DDP collectives: ranks may get unequal batches
        loss_fn = RECON_LOSSES[cfg.vae.recon]
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for batch in self.val_loader():
            x = batch.image.to(acc.device)
            per_image = loss_fn(model(x)["recon"].float(), x, reduction="none").flatten(1).mean(1)
            total += torch.stack([per_image.sum().double(), torch.tensor(len(x), dtype=torch.float64, device=acc.device)])
        if acc.num_processes > 1:
            total = acc.reduce(total, reduction="sum")
        metrics = {"recon": (total[0] / total[1].clamp(min=1)).item(), "samples": int(total[1].item())}
        return {**metrics, **super().validate()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        model = plain_module(self.accelerator, self.model).eval()
        return model.sample(n, generator)

    def export_modules(self) -> dict[str, torch.nn.Module]:
        return {EXPORT_NAME: self.model}

    def export_info(self) -> dict:
        return {**super().export_info(), "latent_dim": plain_module(self.accelerator, self.model).latent_dim}

    def state_tensors(self) -> dict[str, Tensor]:
        return {"vae.step": torch.tensor(self.step)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "vae.step" in tensors:
            self.step = int(tensors["vae.step"])
