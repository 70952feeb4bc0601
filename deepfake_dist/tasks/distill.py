"""Knowledge distillation: a small detector (the student, ``model``) learns from an exported
teacher detector (``distill.teacher``) as well as from the labels.

The reference document's loss is for softmax logits:
``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, y)``. Our detectors give
one logit (fake positive), i.e. a two-class softmax over (0, logit), for which that softmax is
the sigmoid; so the soft term is the binary cross-entropy between ``sigmoid(s/T)`` and the
teacher's soft target ``sigmoid(t/T)``, times T^2 (it differs from the KL by the teacher's
entropy, a constant, so the gradients are the same), and the hard term is the usual BCE.
Selected by the config: ``distill.teacher`` set -> this task; everything else (trainer, launchers,
checkpoints, validation, export) is the detector's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepfake_dist.errors import UserError
from deepfake_dist.models import model_io
from deepfake_dist.models.exported import in_channels, load_exported
from deepfake_dist.tasks import TASKS
from deepfake_dist.tasks.detector import DetectorTask


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, hard) for binary logits; ``soft`` already carries the T^2 factor."""
    soft_targets = torch.sigmoid(teacher / temperature)
    soft = F.binary_cross_entropy_with_logits(student / temperature, soft_targets) * temperature**2
    hard = F.binary_cross_entropy_with_logits(student, labels.float())
    return alpha * soft + (1 - alpha) * hard, soft, hard


@TASKS.register("distill")
class DistillTask(DetectorTask):
    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        """The student is a detector. The teacher file is checked when it is loaded (``__init__``):
        a trained student's config is rebuilt later (compress, export) without its teacher."""
        if cfg.model.kind != "detector":
            raise UserError(f"{where}: distill.teacher is set but model.name {cfg.model.name} is not a detector; "
                            "the student must be a detector (e.g. cnn or resnet18)")
        if model_io(cfg.model.name) != (("image",), ("overall",)):
            raise UserError(f"{where}: distill.teacher is set but model.name {cfg.model.name} scores more than an image "
                            "with one logit; the student must be an image or clip detector (e.g. cnn or temporal)")
        super().check_config(cfg, where)

    def __init__(self, cfg, accelerator, channels: int):
        d = cfg.distill
        super().__init__(cfg, accelerator, channels)
        teacher, info = load_exported(d.teacher)
        if info.get("kind") != "detector":
            raise UserError(f"distill.teacher {d.teacher}: holds a {info.get('kind')} model, not a detector")
        if in_channels(info) != channels or info.get("normalize") != cfg.data.normalize:
            raise UserError(f"distill.teacher {d.teacher} takes {in_channels(info)}-channel images normalized "
                            f"'{info.get('normalize')}', the student gets {channels}-channel '{cfg.data.normalize}'; "
                            f"set data.channels / data.normalize to the teacher's")
        self.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        self.teacher_resolution = int(info["resolution"])
        self.teacher_info = {"checkpoint": str(d.teacher), "model": info["model"], "step": info.get("step"),
                             "manifests": info.get("manifests", {}), "temperature": d.temperature, "alpha": d.alpha}

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.cfg.distill
        logits = self.model(batch.image).float()
        with torch.no_grad():
            images = batch.image
            if images.shape[-1] != self.teacher_resolution:  # the teacher sees its own input size
                size = (self.teacher_resolution, self.teacher_resolution)
                images = F.interpolate(images.flatten(0, -4), size=size, mode="bilinear", antialias=True,
                                       align_corners=False).unflatten(0, images.shape[:-3])
            teacher = self.teacher(images).float()
        total, soft, hard = distillation_loss(logits, teacher, batch.label, d.temperature, d.alpha)
        return total, {"loss_soft": soft.detach(), "loss_hard": hard.detach()}

    def export_info(self) -> dict:
        return {**super().export_info(), "distilled_from": self.teacher_info}
