"""Real-vs-fake detectors: one logit per image (or per clip for clip models such as ``temporal``),
binary cross-entropy, validation metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from deepfake_dist.data.loader import clip_frames, eval_loader
from deepfake_dist.data.video import video_settings
from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS, create_model
from deepfake_dist.predictions import predict
from deepfake_dist.tasks import NONFINITE, TASKS, Task
from deepfake_dist.train.metrics import binary_metrics
from deepfake_dist.train.optim import build_optimizer, build_scheduler

CLASS_NAMES = ["real", "fake"]


@TASKS.register("detector")
class DetectorTask(Task):
    metrics = ("auroc", "ap", "accuracy", "precision", "recall", "f1", "loss", "samples")

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        self.frames = clip_frames(cfg.data.train)
        if bool(MODELS.meta(cfg.model.name).get("clips")) != bool(self.frames):
            hint = (f"it scores clips but {cfg.data.train} hold single images; prepare clip sets with "
                    "deepfake-dist prepare --source videos:PATH" if not self.frames else
                    f"it scores single images but {cfg.data.train} hold clips of {self.frames} frames; use "
                    "model.name=temporal, or sets prepared with --frame-level")
            raise UserError(f"model.name {cfg.model.name}: {hint}")
        self.val_loader()  # a validation split that is empty or lacks a shard is refused now, not after an epoch
        model = self.on_device(self._build_model())
        # Without a loss scaler or DeepSpeed (whose backward also steps), a fused optimizer skips
        # a NaN/inf update on the device, as the GradScaler makes it do: no step waits for the GPU.
        self.skip_on_device = accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
        trainable = [p for p in model.parameters() if p.requires_grad]  # not a frozen part (a probe's backbone)
        opt = build_optimizer(trainable, cfg.optim, fused=self.skip_on_device)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.sched = None
        self.window_bad = None  # a NaN/inf met in this accumulation window so far (a device flag)

    def _build_model(self) -> torch.nn.Module:
        """The model, checked with one eval-mode forward of a blank sample: settings it refuses
        (``model.dropout: 2``) or an input it cannot take (a resolution too small for its depth)
        are a UserError now, before the run folder exists, not a traceback at the first batch."""
        cfg, size = self.cfg, self.cfg.data.resolution
        shape = (1, *([self.frames] if self.frames else []), self.channels, size, size)
        try:
            model = create_model(cfg.model.name, in_channels=self.channels, **cfg.model.args)
        except (TypeError, ValueError) as err:
            raise UserError(f"model {cfg.model.name} cannot be built from model.* {cfg.model.args} "
                            f"({' '.join(str(err).split())[:200]}); fix those settings") from None
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(shape))
        except (RuntimeError, ValueError, AssertionError) as err:
            reason = " ".join(str(err).split())[:200]
            raise UserError(f"model {cfg.model.name} cannot take {size}x{size} inputs ({reason}); change "
                            "data.resolution or the model's settings") from None
        return model.train()

    def set_total_steps(self, total_steps: int) -> None:
        self.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's training loss, and extra values to log (distillation changes this)."""
        logits = self.model(batch.image)
        return F.binary_cross_entropy_with_logits(logits.float(), batch.label.float()), {}

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, logs = self.loss(batch)
            if not self.skip_on_device and self.nonfinite(loss):  # before a backward that would apply it
                return self._skip()
            acc.backward(loss)
            checks = [loss]
            if acc.sync_gradients and self.cfg.train.grad_clip:
                norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                checks.append(norm)  # inf gradients would reach the weights
            if self.skip_on_device:  # the loss and the gradient norm, on every rank alike, left on the GPU
                bad = logs[NONFINITE] = self.nonfinite_flag(*checks)
                self.window_bad = bad if self.window_bad is None else torch.maximum(self.window_bad, bad)
                self.opt.optimizer.found_inf = self.window_bad  # the update is skipped where it is 1
            self.opt.step()
            if acc.sync_gradients:
                self.sched.step()
                self.window_bad = None
            self.opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), **logs, "lr": self.sched.get_last_lr()[0]}

    def _skip(self) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        return {NONFINITE: 1.0, "lr": self.sched.get_last_lr()[0]}

    def val_loader(self):
        cfg = self.cfg
        return eval_loader(cfg.data, cfg.data.val or cfg.data.train, cfg.data.val_split, self.channels,
                           self.accelerator.process_index, self.accelerator.num_processes)

    def validate(self) -> dict[str, float]:
        preds = predict(self.accelerator, self.model, self.val_loader())
        metrics = binary_metrics(preds.scores, preds.labels)
        metrics["loss"] = F.binary_cross_entropy_with_logits(preds.logits, preds.labels.float()).item()
        metrics["samples"] = len(preds.keys)
        return metrics

    def export_modules(self) -> dict[str, torch.nn.Module]:
        """What the best checkpoint exports, by file name."""
        return {"model": self.model}

    def export_info(self) -> dict:
        info = {"kind": "detector", "class_names": CLASS_NAMES, "threshold": 0.5,
                "build_args": {"in_channels": self.channels}}
        video = video_settings(self.cfg.data.train)  # so predict cuts a new video's clips the same way
        return {**info, "frames": self.frames, **({"video": video} if video else {})}
