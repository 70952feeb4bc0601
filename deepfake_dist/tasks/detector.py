"""Real-vs-fake detectors: one logit per image (or per clip for clip models such as ``temporal``),
binary cross-entropy, validation metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from deepfake_dist.data.faces import video_settings
from deepfake_dist.data.loader import clip_frames
from deepfake_dist.engine.metrics import binary_metrics
from deepfake_dist.engine.optim import build_optimizer, build_scheduler
from deepfake_dist.engine.step import OptimizerStep
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.predictions import predict
from deepfake_dist.tasks import TASKS, Task

CLASS_NAMES = ["real", "fake"]


@TASKS.register("detector")
class DetectorTask(Task):
    metrics = ("auroc", "ap", "accuracy", "precision", "recall", "f1", "loss", "samples")

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        """A clip model trains on clip sets, an image model on image sets."""
        super().check_config(cfg, where)
        frames = clip_frames(cfg.data.train)
        if bool(cfg.model.meta.get("clips")) != bool(frames):
            hint = (f"it scores clips but {cfg.data.train} hold single images; prepare clip sets with "
                    "deepfake-dist prepare --source videos:PATH" if not frames else
                    f"it scores single images but {cfg.data.train} hold clips of {frames} frames; use "
                    "model.name=temporal, or sets prepared with --frame-level")
            raise UserError(f"{where}: model.name {cfg.model.name}: {hint}")

    def __init__(self, cfg, accelerator, channels: int):
        super().__init__(cfg, accelerator, channels)
        self.frames = clip_frames(cfg.data.train)
        self.val_loader()  # a validation split that is empty or lacks a shard is refused now, not after an epoch
        model = self.on_device(self._build_model())
        # Without a loss scaler or DeepSpeed (whose backward also steps), a fused optimizer skips
        # a NaN/inf update on the device: see ``OptimizerStep``.
        skip_on_device = accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
        opt = build_optimizer(model.parameters(), cfg.optim, fused=skip_on_device)
        self.model, self.opt = accelerator.prepare(model, opt)
        self.optimizer_step = OptimizerStep(accelerator, self.model, self.opt, cfg.train.grad_clip, skip_on_device)

    def _build_model(self) -> torch.nn.Module:
        """The model, checked with one eval-mode forward of a blank sample: settings it refuses
        (``model.dropout: 2``) or an input it cannot take (a resolution too small for its depth)
        are a UserError now, before the run folder exists, not a traceback at the first batch."""
        cfg, size = self.cfg, self.cfg.data.resolution
        shape = (1, *([self.frames] if self.frames else []), self.channels, size, size)
        try:
            model = cfg.model.build(in_channels=self.channels)
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
        self.optimizer_step.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's training loss, and extra values to log (distillation changes this)."""
        logits = self.model(batch.image)
        return F.binary_cross_entropy_with_logits(logits.float(), batch.label.float()), {}

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        return self.optimizer_step(lambda: self.loss(batch))

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
