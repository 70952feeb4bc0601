"""StyleGAN2 training: the GAN task (two engines, D frozen during the G step, the EMA generator,
grids, FID/KID) with what StyleGAN2 adds (``stylegan2`` section of the config):

- noise inputs and style mixing drawn from the step's own generator, on the device;
- lazy R1: every ``r1_every`` batches the discriminator's loss gains
  ``r1_gamma / 2 * r1_every * |grad_x D(x)|^2`` on the real images (a double backward);
- path-length regularisation (``pl_weight`` > 0): every ``pl_every`` batches the generator's
  loss gains ``pl_weight * pl_every * (|J_w^T y| - a)^2`` on half the batch, ``a`` the running
  mean of the lengths (averaged over ranks, so every rank holds the same and a resume restores it);
- DiffAugment (``augment``) of real and fake images before every discriminator call.

Truncation at synthesis uses the mapping network's tracked average w (``generate --truncation``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepfake_dist.engine.runtime import plain_module
from deepfake_dist.errors import UserError
from deepfake_dist.models.stylegan2 import draw
from deepfake_dist.tasks import TASKS
from deepfake_dist.tasks.diffaugment import diff_augment
from deepfake_dist.tasks.gan import GANTask
from deepfake_dist.tasks.generative import step_generator

PL_DECAY = 0.01  # the running mean of path lengths moves this far towards each new batch's


@TASKS.register("stylegan2")
class StyleGAN2Task(GANTask):
    synthesis = "style"

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        super().check_config(cfg, where)
        s = cfg.stylegan2
        for key in ("r1_gamma", "pl_weight"):
            if getattr(s, key) < 0:
                raise UserError(f"{where}: 'stylegan2.{key}' must be >= 0 (0: off), got {getattr(s, key)}")
        for key in ("r1_every", "pl_every"):
            if getattr(s, key) < 1:
                raise UserError(f"{where}: 'stylegan2.{key}' is a number of batches, at least 1; got {getattr(s, key)}")
        if not 0.0 <= s.style_mixing <= 1.0:
            raise UserError(f"{where}: 'stylegan2.style_mixing' is a probability in [0, 1], got {s.style_mixing}")
        if len(set(s.augment)) != len(s.augment):
            raise UserError(f"{where}: 'stylegan2.augment' lists an operation twice: {s.augment}")

    def __init__(self, cfg, accelerator, channels: int):
        plugins = accelerator.state.deepspeed_plugins or {}
        if any(p.zero_stage == 3 for p in plugins.values()) and (cfg.stylegan2.r1_gamma or cfg.stylegan2.pl_weight):
            raise UserError("stylegan2's R1 and path-length penalties run the bare networks, whose weights ZeRO-3 "
                            "partitions; launch with ZeRO-1 or 2 (configs/accelerate/deepspeed_zero2.yaml), or set "
                            "stylegan2.r1_gamma: 0 and stylegan2.pl_weight: 0")
        super().__init__(cfg, accelerator, channels)
        self.pl_mean = torch.zeros((), device=accelerator.device)

    def _step_rng(self) -> torch.Generator:
        """Drawn on the device: the noise inputs are image-sized, one map per layer."""
        return step_generator((self.cfg.seed, "stylegan2", self.accelerator.process_index, self.step),
                              self.accelerator.device)

    def _generate(self, n: int, labels: Tensor | None, rng: torch.Generator) -> Tensor:
        return self.G(self._noise(n, rng), labels, noise=rng, mixing=self.cfg.stylegan2.style_mixing)

    def _discriminate(self, images: Tensor, labels: Tensor | None, rng: torch.Generator) -> Tensor:
        return super()._discriminate(diff_augment(images, self.cfg.stylegan2.augment, rng), labels, rng)

    def _d_loss(self, real: Tensor, fake: Tensor, labels: Tensor | None, rng: torch.Generator):
        loss, real_logits, fake_logits, logs = super()._d_loss(real, fake, labels, rng)
        s = self.cfg.stylegan2
        if s.r1_gamma and self.step % s.r1_every == 0:
            penalty = self._r1_penalty(real, rng)
            loss = loss + penalty * (s.r1_gamma / 2 * s.r1_every)
            logs = {**logs, "r1": penalty.detach()}
        return loss, real_logits, fake_logits, logs

    def _g_loss(self, fake: Tensor, labels: Tensor | None, rng: torch.Generator):
        loss, logs = super()._g_loss(fake, labels, rng)
        s = self.cfg.stylegan2
        if s.pl_weight and self.step % s.pl_every == 0:
            penalty = self._path_length_penalty(max(fake.shape[0] // 2, 1), rng)
            loss = loss + penalty * (s.pl_weight * s.pl_every)
            logs = {**logs, "pl_penalty": penalty.detach(), "pl_mean": self.pl_mean.clone()}
        return loss, logs

    # The penalties take a gradient of a network's output (a double backward) through the bare
    # network: through a DeepSpeed engine's output, that gradient would run the engine's backward
    # hooks (gradient reduction) before the loss's own backward. The parameters' gradients still
    # come from the loss's one backward through the engine.

    def _r1_penalty(self, real: Tensor, rng: torch.Generator) -> Tensor:
        """|grad_x D(x)|^2 on the real images: keeps D flat around the data."""
        real = real.detach().requires_grad_(True)
        logits = plain_module(self.accelerator, self.D)(diff_augment(real, self.cfg.stylegan2.augment, rng))
        (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
        return grad.float().square().sum((1, 2, 3)).mean()

    def _path_length_penalty(self, n: int, rng: torch.Generator) -> Tensor:
        """How far the length of J_w^T y (y: random image-space directions) strays from its running
        mean: small where a fixed step in w moves the image by a fixed amount."""
        G = plain_module(self.accelerator, self.G)
        images, ws = G(self._noise(n, rng), noise=rng, mixing=self.cfg.stylegan2.style_mixing, return_ws=True)
        directions = draw(tuple(images.shape), rng, images) / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images * directions).sum(), ws, create_graph=True)
        lengths = grad.float().square().sum(2).mean(1).sqrt()
        mean = lengths.detach().mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        self.pl_mean.lerp_(mean, PL_DECAY)
        return (lengths - self.pl_mean).square().mean()

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "stylegan2.pl_mean": self.pl_mean}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(tensors)
        if "stylegan2.pl_mean" in tensors:
            self.pl_mean.copy_(tensors["stylegan2.pl_mean"])
