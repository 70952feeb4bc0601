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

from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.models import create_model
from deepfake_dist.models.autoencoder import RECON_LOSSES, vae_loss
from deepfake_dist.tasks import NONFINITE, TASKS
from deepfake_dist.tasks.generative import EXPORT_NAME, GenerativeTask
from deepfake_dist.train.optim import build_optimizer, build_scheduler
from deepfake_dist.train.runtime import plain_module


@TASKS.register("autoencoder")
class AutoEncoderTask(GenerativeTask):
    metrics = ("recon", "samples", *GenerativeTask.metrics)

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        model = self.on_device(create_model(cfg.model.name, **self.build_args, **cfg.model.args))
        opt = build_optimizer(model.parameters(), cfg.optim)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.sched = None
        self.step = 0

    def set_total_steps(self, total_steps: int) -> None:
        super().set_total_steps(total_steps)
        self.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def kl_weight(self) -> float:
        warmup = self.cfg.vae.kl_warmup_steps
        return self.cfg.vae.kl_weight * (min(self.step / warmup, 1.0) if warmup else 1.0)

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        kl_weight = self.kl_weight()
        with self.accelerator.accumulate(self.model):
            out = self.model(batch.image)
            out = {k: v.float() if v is not None else None for k, v in out.items()}
            losses = vae_loss(out, batch.image.float(), kl_weight, self.cfg.vae.recon)
            if self.nonfinite(losses["loss"]):  # skipped on every rank, counted by the loop
                self.opt.zero_grad(set_to_none=True)
                return {NONFINITE: 1.0, "lr": self.sched.get_last_lr()[0]}
            self.accelerator.backward(losses["loss"])
            if self.accelerator.sync_gradients and self.cfg.train.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.opt.step()
            if self.accelerator.sync_gradients:
                self.sched.step()
                self.step += 1
            self.opt.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self.broadcast_buffers(self.model)
        return {**{k: v.detach() for k, v in losses.items()}, "kl_weight": kl_weight,
                "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean per-image reconstruction loss over the whole held-out split, summed over ranks."""
        cfg, acc = self.cfg, self.accelerator
        model = plain_module(acc, self.model).eval()  # no DDP collectives: ranks may get unequal batches
        loss_fn = RECON_LOSSES[cfg.vae.recon]
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for batch in eval_loader(cfg.data.val or cfg.data.train, cfg.data.val_split,
                                 EvalOptions.from_data(cfg.data, self.channels), acc.process_index, acc.num_processes):
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
