"""Training tasks: what differs between detectors, GANs and autoencoders (their step, what they
validate, what they export). The loop in ``deepfake_dist.train.loop`` runs any of them; the task
is picked by the model's ``kind`` in the model registry."""

from __future__ import annotations

from deepfake_dist.registry import Registry

TASKS = Registry("task")


def create_task(cfg, accelerator, channels: int):
    from deepfake_dist.models import model_kind
    from deepfake_dist.tasks import detector  # noqa: F401  (registers)

    return TASKS.get(model_kind(cfg.model.name))(cfg, accelerator, channels)
