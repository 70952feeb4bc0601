"""GAN training (``dcgan``, ``cdcgan``): two models, two optimizers, one loop.

Per batch: ``gan.d_steps`` discriminator updates on real images against detached fakes, then
one generator update through the frozen discriminator (``requires_grad_(False)``, so DDP and
ZeRO-2 see each parameter's gradient once), then an EMA update of the generator. Losses:
non-saturating BCE or hinge. Under DDP one ``prepare(G, D, opt_g, opt_d)``; under DeepSpeed
each network is its own engine (``engines``), prepared after selecting its plugin, and each
loss goes to its own engine's backward and step. The EMA generator is what samples, FID,
synthesis and the exported ``generator.safetensors`` use; it is checkpointed as safetensors.
A GAN that trains differently (StyleGAN2: noise inputs, penalties, augmentation) overrides the
step's parts: ``_generate``, ``_discriminate``, ``_d_loss`` and ``_g_loss``.
"""

from __future__ import annotations

import dataclasses
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

from deepfake_dist.ema import EMA
from deepfake_dist.engine.optim import build_optimizer
from deepfake_dist.engine.runtime import plain_module
from deepfake_dist.engine.step import NONFINITE, nonfinite
from deepfake_dist.errors import UserError
from deepfake_dist.models.convstacks import gaussian
from deepfake_dist.tasks import TASKS
from deepfake_dist.tasks.generative import EXPORT_NAME, GenerativeTask, step_generator


def d_loss(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    """Discriminator loss on real and fake logits (real = positive)."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(fake: Tensor, kind: str) -> Tensor:
    """Generator loss on the discriminator's logits of fakes (non-saturating for BCE)."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def condition_labels(metas: list[dict], key: str, num_classes: int) -> Tensor:
    """The integer at dotted ``key`` of each sample's json, checked against ``num_classes``."""
    labels = []
    for meta in metas:
        try:
            value = reduce(lambda node, part: node[part], key.split("."), meta)
        except (KeyError, TypeError):
            raise UserError(f"gan.condition '{key}': a sample's json has no such key (it has {sorted(meta)})") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
            raise UserError(f"gan.condition '{key}': value {value!r} is not an integer in [0, {num_classes}); "
                            "set model.num_classes to the number of classes")
        labels.append(value)
    return torch.tensor(labels, dtype=torch.long)


@TASKS.register("gan")
class GANTask(GenerativeTask):
    engines = ("generator", "discriminator")

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        super().check_config(cfg, where)
        if cfg.train.grad_accum != 1:
            raise UserError(f"{where}: GANs step both networks every batch; set train.grad_accum: 1")
        if cfg.sched.name != "constant" or cfg.sched.warmup_steps:
            raise UserError(f"{where}: GANs train at a constant learning rate; set sched.name: constant, warmup_steps: 0")
        if cfg.model.arg("num_classes", 0) and not cfg.gan.condition:
            raise UserError(f"{where}: {cfg.model.name} is conditional; set gan.condition to the json key of "
                            "each sample's class, e.g. attributes.Male")

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        gan = self.on_device(cfg.model.build(**self.build_args))
        self.z_dim, self.num_classes = gan.z_dim, gan.num_classes
        # the EMA copy is taken before prepare: under ZeRO-3 the prepared weights are partitioned
        self.ema = EMA(gan.generator, cfg.gan.ema_decay)
        self.ema.averaged.to(accelerator.device)
        opt_g = build_optimizer(gan.generator.parameters(), cfg.optim)
        d_optim = dataclasses.replace(cfg.optim, lr=cfg.gan.d_lr or cfg.optim.lr)
        opt_d = build_optimizer(gan.discriminator.parameters(), d_optim)
        self.step = 0  # batches trained so far (checkpointed): seeds each batch's noise
        self.deepspeed = accelerator.state.deepspeed_plugins is not None
        if self.deepspeed:
            accelerator.state.select_deepspeed_plugin("generator")
            self.G, self.opt_g = accelerator.prepare(gan.generator, opt_g)
            accelerator.state.select_deepspeed_plugin("discriminator")
            self.D, self.opt_d = accelerator.prepare(gan.discriminator, opt_d)
        else:
            self.G, self.D, self.opt_g, self.opt_d = accelerator.prepare(gan.generator, gan.discriminator, opt_g, opt_d)

    def _labels(self, batch) -> Tensor | None:
        if not self.num_classes:
            return None
        return condition_labels(batch.meta, self.cfg.gan.condition, self.num_classes).to(self.accelerator.device)

    def _step_rng(self) -> torch.Generator:
        """This step's noise (see ``step_generator``), drawn on the CPU."""
        return step_generator((self.cfg.seed, "gan", self.accelerator.process_index, self.step), "cpu")

    def _noise(self, n: int, rng: torch.Generator) -> Tensor:
        return gaussian(n, self.z_dim, self.accelerator.device, rng)

    def _update(self, model, opt, loss: Tensor) -> None:
        if self.deepspeed:  # this loss to this engine: its backward, clipping, step and zero_grad
            from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

            DeepSpeedEngineWrapper(model).backward(loss)
            return
        self.accelerator.backward(loss)
        if self.cfg.train.grad_clip:
            self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        steps = self.cfg.gan.d_steps
        self.G.train()
        self.D.train()
        real, labels = batch.image, self._labels(batch)
        rng = self._step_rng()
        for i in range(steps):
            with torch.set_grad_enabled(i == steps - 1):  # the last fakes also train G
                fake = self._generate(real.shape[0], labels, rng)
            loss_d, real_logits, fake_logits, logs = self._d_loss(real, fake.detach(), labels, rng)
            if nonfinite(self.accelerator, loss_d):
                return self._skip()
            self._update(self.D, self.opt_d, loss_d)

        self.D.requires_grad_(False)
        try:
            loss_g, g_logs = self._g_loss(fake, labels, rng)
            if nonfinite(self.accelerator, loss_g):
                return self._skip()  # the discriminator updates of this batch stay: they were finite
            self._update(self.G, self.opt_g, loss_g)
        finally:
            self.D.requires_grad_(True)
        self.broadcast_buffers(self.G, self.D)
        self.ema.update(plain_module(self.accelerator, self.G))
        self.step += 1
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
                "d_real": torch.sigmoid(real_logits.detach()).mean(),
                "d_fake": torch.sigmoid(fake_logits.detach()).mean(),
                **logs, **g_logs, "lr": self.opt_g.param_groups[0]["lr"]}

    def _generate(self, n: int, labels: Tensor | None, rng: torch.Generator) -> Tensor:
        """``n`` training fakes (the prepared generator, in train mode)."""
        return self.G(self._noise(n, rng), labels)

    def _discriminate(self, images: Tensor, labels: Tensor | None, rng: torch.Generator) -> Tensor:
        """The discriminator's logits, in fp32 for the losses."""
        return self.D(images, labels).float()

    def _d_loss(self, real: Tensor, fake: Tensor, labels: Tensor | None,
                rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(loss, real logits, fake logits, extra values to log) of one discriminator update."""
        real_logits = self._discriminate(real, labels, rng)
        fake_logits = self._discriminate(fake, labels, rng)
        return d_loss(real_logits, fake_logits, self.cfg.gan.loss), real_logits, fake_logits, {}

    def _g_loss(self, fake: Tensor, labels: Tensor | None, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, extra values to log) of the generator update, through the frozen discriminator."""
        return g_loss(self._discriminate(fake, labels, rng), self.cfg.gan.loss), {}

    def _skip(self) -> dict[str, float]:
        """A NaN/inf loss: no update from it (see ``engine.step``); the batch counts as a step
        so the next one draws fresh noise."""
        self.opt_d.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        self.step += 1
        return {NONFINITE: 1.0, "lr": self.opt_g.param_groups[0]["lr"]}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        G = self.ema.module
        z = G.sample_noise(n, generator)
        labels = torch.arange(n, device=z.device) % self.num_classes if self.num_classes else None
        return G(z, labels)

    def export_modules(self) -> dict[str, torch.nn.Module]:
        return {EXPORT_NAME: self.ema.module}

    def replicated_modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.G, "discriminator": self.D}

    def export_info(self) -> dict:
        return {**super().export_info(), "module": "generator", "z_dim": self.z_dim,
                "num_classes": self.num_classes, "condition": self.cfg.gan.condition}

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.ema.state_tensors(), "gan.step": torch.tensor(self.step)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.ema.load_state_tensors(tensors)
        self.step = int(tensors.get("gan.step", 0))
