"""Real-vs-fake detectors: one logit per image (or per clip for clip models such as ``temporal``),
binary cross-entropy, validation metrics.

A detector that takes a clip's sound or has several heads declares it (``models.model_io``):
its inputs are taken from the batch by name (``image``, ``audio``), and each head learns its own
label (``overall``: the sample's; ``video``, ``audio``: the per-stream labels of the batch's
``extra``), the binary cross-entropies averaged over heads and samples, leaving out the audio
label of a clip without sound. Validation reports the first head against its label, and the
ROC-AUC of every other head (``auroc_video``, ``auroc_audio``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from deepfake_dist.data.audio import audio_samples
from deepfake_dist.data.faces import video_settings
from deepfake_dist.data.loader import clip_frames
from deepfake_dist.data.manifest import load_manifest
from deepfake_dist.engine.metrics import binary_metrics
from deepfake_dist.engine.optim import build_optimizer, build_scheduler
from deepfake_dist.engine.step import OptimizerStep
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.modalities import head_targets
from deepfake_dist.evaluation.predictions import predict
from deepfake_dist.models import model_io
from deepfake_dist.tasks import TASKS, Task

CLASS_NAMES = ["real", "fake"]
STREAM_LABELS = {"video": "label_video", "audio": "label_audio"}  # head -> the batch's extra label


@TASKS.register("detector")
class DetectorTask(Task):
    metrics = ("auroc", "ap", "accuracy", "precision", "recall", "f1", "loss", "samples", "auroc_video", "auroc_audio")

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        """A clip model trains on clip sets, an image model on image sets; a model of the sound
        on sets prepared with it; a head's metric is monitored only where the model has the head."""
        super().check_config(cfg, where)
        inputs, heads = model_io(cfg.model.name)
        head = cfg.train.monitor.removeprefix("val/auroc_")
        if head in STREAM_LABELS and head not in heads[1:]:
            raise UserError(f"{where}: 'train.monitor' is {cfg.train.monitor}, the ROC-AUC of a {head} head, which "
                            f"model.name {cfg.model.name} does not have (its heads: {', '.join(heads)}); monitor val/auroc")
        for folder in [*cfg.data.train, *(cfg.data.val or [])] if "audio" in inputs else []:
            if not audio_samples([folder]):
                raise UserError(f"{where}: model.name {cfg.model.name} scores a clip's sound, but {folder} holds none "
                                f"(source {load_manifest(folder).get('source')}); prepare it with --audio from videos "
                                "that have an audio track")
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
        self.inputs, self.heads = model_io(cfg.model.name)
        self.audio = audio_samples(cfg.data.train)
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
        shapes = {"image": (1, *([self.frames] if self.frames else []), self.channels, size, size), "audio": (1, self.audio)}
        try:
            model = cfg.model.build(in_channels=self.channels)
        except (TypeError, ValueError) as err:
            raise UserError(f"model {cfg.model.name} cannot be built from model.* {cfg.model.args} "
                            f"({' '.join(str(err).split())[:200]}); fix those settings") from None
        try:
            with torch.no_grad():
                model.eval()(*(torch.zeros(shapes[name]) for name in self.inputs))
        except (RuntimeError, ValueError, AssertionError) as err:
            reason = " ".join(str(err).split())[:200]
            raise UserError(f"model {cfg.model.name} cannot take {size}x{size} inputs ({reason}); change "
                            "data.resolution or the model's settings") from None
        return model.train()

    def set_total_steps(self, total_steps: int) -> None:
        self.optimizer_step.sched = self.accelerator.prepare(build_scheduler(self.opt, self.cfg.sched, total_steps))

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's training loss, and extra values to log (distillation changes this)."""
        logits = self.model(*batch.inputs(self.inputs)).float().reshape(len(batch), len(self.heads))
        if self.heads == ("overall",):
            return F.binary_cross_entropy_with_logits(logits[:, 0], batch.label.float()), {}
        targets, counted = self.targets(batch)
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (losses * counted).sum() / counted.sum().clamp(min=1), {}

    def targets(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads) labels as floats and which of them count (see the module docstring)."""
        labels = [batch.extra.get(STREAM_LABELS.get(head), batch.label) for head in self.heads]
        counted = [batch.extra["has_audio"] if head == "audio" else torch.ones_like(batch.label, dtype=torch.bool)
                   for head in self.heads]
        return torch.stack(labels, 1).float(), torch.stack(counted, 1).float()

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        self.model.train()
        return self.optimizer_step(lambda: self.loss(batch))

    def validate(self) -> dict[str, float]:
        preds = predict(self.accelerator, self.model, self.val_loader(), self.inputs, self.heads)
        labels, counted = head_targets(preds, self.heads[0])
        metrics = binary_metrics(preds.scores[counted], labels[counted])
        metrics["loss"] = F.binary_cross_entropy_with_logits(preds.logits[counted], labels[counted].float()).item()
        metrics["samples"] = len(preds.keys)
        for head in self.heads[1:]:
            labels, counted = head_targets(preds, head)
            auroc = binary_metrics(torch.sigmoid(preds.heads[head][counted]), labels[counted]).get("auroc")
            if auroc is not None:
                metrics[f"auroc_{head}"] = auroc
        return metrics

    def export_modules(self) -> dict[str, torch.nn.Module]:
        """What the best checkpoint exports, by file name."""
        return {"model": self.model}

    def export_info(self) -> dict:
        info = {"kind": "detector", "class_names": CLASS_NAMES, "threshold": 0.5,
                "build_args": {"in_channels": self.channels}}
        video = video_settings(self.cfg.data.train)  # so predict cuts a new video's clips the same way
        sound = {"audio": {"samples": self.audio}} if "audio" in self.inputs else {}  # predict fits a clip's sound to it
        return {**info, "frames": self.frames, **({"video": video} if video else {}), **sound}
