"""Training tasks: what differs between detectors, GANs and autoencoders (their step, what they
validate, what they export). The loop in ``deepfake_dist.train.loop`` runs any of them; the task
is picked by the model's ``kind`` in the model registry."""

from __future__ import annotations

import importlib
import pkgutil

import torch
from accelerate.utils import DistributedType

from deepfake_dist.registry import Registry

TASKS = Registry("task")
NONFINITE = "nonfinite"  # a train_step's logs: 1.0 (or a device flag) when it skipped its batch (Task.nonfinite_flag)


class Task:
    """What the loop calls. Subclasses register with ``@TASKS.register(kind)``."""

    # Under DeepSpeed: one engine (plugin) per name, for tasks that step several models apart
    # (a GAN's generator and discriminator); empty: the launcher's single engine.
    engines: tuple[str, ...] = ()
    # What ``validate`` can report: ``train.monitor`` ranks by one of them (as val/NAME).
    metrics: tuple[str, ...] = ()

    def __init__(self, cfg, accelerator, channels: int):
        self.cfg, self.accelerator, self.channels = cfg, accelerator, channels

    def set_total_steps(self, total_steps: int) -> None:
        """Called once the run's length is known (schedules need it)."""

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        """One batch: forward, backward(s), optimizer step(s); returns what to log. Losses stay
        0-dim tensors: the loop reads them only at log steps, so logging makes no step wait for the GPU."""
        raise NotImplementedError

    def on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in the memory layout it trains fastest in here (call before ``prepare``):
        channels_last on a GPU unless ``train.channels_last`` is off (see ``memory_format``)."""
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        return model.to(memory_format=memory_format(self.cfg.train.channels_last, self.accelerator.device, deepspeed))

    def nonfinite_flag(self, *values: torch.Tensor) -> torch.Tensor:
        """1.0 where any of ``values`` (losses, a gradient norm) is NaN/inf on any rank, else 0.0:
        a 0-dim tensor left on the device, so nothing waits for the GPU to compute it (a fused
        optimizer takes it as ``found_inf``, the loop reads it at log steps). A collective: every
        rank must call it."""
        bad = torch.stack([~torch.isfinite(v).all() for v in values]).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum").clamp_(max=1)
        return bad.reshape(())

    def nonfinite(self, *values: torch.Tensor) -> bool:
        """``nonfinite_flag`` read now (one wait for the GPU), for steps that must decide on the
        host. The step then skips its batch on every rank alike (no optimizer step, gradients
        zeroed), so DDP replicas stay in step, and returns ``{NONFINITE: 1.0}``: the loop counts
        these and stops after ``train.max_nonfinite`` in a row."""
        return bool(self.nonfinite_flag(*values).item() > 0)

    def after_step(self, step: int, tracker) -> None:
        """Periodic extras after an optimizer step (e.g. a GAN's sample grid)."""

    def validate(self) -> dict[str, float]:
        """Metrics on the validation split; ``train.monitor`` picks the best by one of them."""
        return {}

    def export_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the best checkpoint exports as ``<name>.safetensors`` + ``<name>.json``."""
        return {}

    def export_info(self) -> dict:
        return {}

    def replicated_modules(self) -> dict[str, torch.nn.Module]:
        """Modules every rank holds a replica of; the loop checks the replicas agree at the end."""
        return self.export_modules()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra state outside ``save_state`` (e.g. an EMA), saved as safetensors (no pickle)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def memory_format(channels_last: bool, device: torch.device, deepspeed: bool) -> torch.memory_format:
    """NHWC convolutions run on a GPU's tensor cores without transposes (on an H100, resnet18 at
    224 px trains 2.0x faster in bf16, BENCHMARKS.md); on a CPU, and under DeepSpeed (whose flat
    parameter buffers are contiguous), the default layout."""
    if channels_last and device.type == "cuda" and not deepspeed:
        return torch.channels_last
    return torch.contiguous_format


def task_class(cfg) -> type[Task]:
    from deepfake_dist.models import model_kind

    for module in pkgutil.iter_modules(__path__):  # every task module registers itself
        importlib.import_module(f"{__name__}.{module.name}")
    return TASKS.get("distill" if cfg.distill.teacher else model_kind(cfg.model.name))  # distill: a student detector


def create_task(cfg, accelerator, channels: int) -> Task:
    return task_class(cfg)(cfg, accelerator, channels)
