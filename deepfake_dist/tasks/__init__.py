"""Training tasks: what differs between detectors, GANs, autoencoders and diffusion models (their
step, what they validate, what they export, which settings they refuse). The trainer in
``deepfake_dist.train.loop`` runs any of them; the task is picked by the model's entry in the model
registry (its ``task``, else its ``kind``)."""

from __future__ import annotations

import importlib
import pkgutil

import torch
from accelerate.utils import DistributedType

from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.errors import UserError
from deepfake_dist.registry import Registry, closest

TASKS = Registry("task")


class Task:
    """What the trainer calls. Subclasses register with ``@TASKS.register(kind)``."""

    # Under DeepSpeed: one engine (plugin) per name, for tasks that step several models apart
    # (a GAN's generator and discriminator); empty: the launcher's single engine.
    engines: tuple[str, ...] = ()
    # What ``validate`` can report: ``train.monitor`` ranks by one of them (as val/NAME).
    metrics: tuple[str, ...] = ()

    def __init__(self, cfg, accelerator, channels: int):
        self.cfg, self.accelerator, self.channels = cfg, accelerator, channels

    @classmethod
    def check_config(cls, cfg, where: str) -> None:
        """Refuse settings this task cannot run with; called once the config is built (see
        ``config.build_config``), before any accelerator or data work. Subclasses check their own
        sections after calling this. ``train.monitor`` must name a metric the task reports; the
        default, val/auroc, is left to fall back to the latest model where there is none (a
        generator without the Inception file)."""
        monitor, default = cfg.train.monitor, type(cfg.train).monitor  # the class holds the dataclass default
        if monitor == default or monitor.removeprefix("val/") in cls.metrics:
            return
        choices = [f"val/{name}" for name in cls.metrics]
        raise UserError(f"{where}: 'train.monitor' is {monitor!r}, which a {cfg.model.name} run does not report"
                        f"{closest(monitor, choices)}; choose one of: {', '.join(choices)}")

    def set_total_steps(self, total_steps: int) -> None:
        """Called once the run's length is known (schedules need it)."""

    def train_step(self, batch) -> dict[str, float | torch.Tensor]:
        """One batch: forward, backward(s), optimizer step(s); returns what to log. Losses stay
        0-dim tensors: the trainer reads them only at log steps, so logging makes no step wait for
        the GPU. A batch skipped for a NaN/inf loss logs ``engine.step.NONFINITE``."""
        raise NotImplementedError

    def on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in the memory layout it trains fastest in here (call before ``prepare``):
        channels_last on a GPU unless ``train.channels_last`` is off (see ``memory_format``)."""
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        return model.to(memory_format=memory_format(self.cfg.train.channels_last, self.accelerator.device, deepspeed))

    def val_loader(self, whole: bool = False):
        """The validation split (``data.val_split`` of ``data.val``, or of ``data.train`` when
        there is none), this rank's share of it; ``whole``: all of it, on every rank."""
        cfg, acc = self.cfg, self.accelerator
        rank, world = (0, 1) if whole else (acc.process_index, acc.num_processes)
        return eval_loader(cfg.data.val or cfg.data.train, cfg.data.val_split, EvalOptions.from_data(cfg.data, self.channels),
                           rank, world)

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
    """NHWC convolutions run on a GPU's tensor cores without transposes (the gain is in
    BENCHMARKS.md); on a CPU, and under DeepSpeed (whose flat parameter buffers are contiguous),
    the default layout."""
    if channels_last and device.type == "cuda" and not deepspeed:
        return torch.channels_last
    return torch.contiguous_format


def task_class(cfg) -> type[Task]:
    """A student detector's task when ``distill.teacher`` is set, else the model's own (``ModelConfig.task``)."""
    for module in pkgutil.iter_modules(__path__):  # every task module registers itself
        importlib.import_module(f"{__name__}.{module.name}")
    return TASKS.get("distill" if cfg.distill.teacher else cfg.model.task)


def create_task(cfg, accelerator, channels: int) -> Task:
    return task_class(cfg)(cfg, accelerator, channels)
