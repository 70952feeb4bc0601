"""Build the Accelerator for any launch mode: CPU/gloo, one GPU, DDP, DeepSpeed, multi-node."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

from deepfake_dist.config import Config
from deepfake_dist.train.tracking import tracker_name


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: Config, engines: tuple[str, ...] = (), **kwargs) -> Accelerator:
    """Pick the process group for the launch mode.

    Without CUDA, Accelerate only forms a multi-process group when told ``cpu=True`` (then gloo);
    DeepSpeed on CPU instead needs ``DS_ACCELERATOR=cpu`` and an explicit gloo backend, and
    ``cpu=True`` would turn it off. The group's timeout is ``train.timeout_s``. ``engines``
    (a task's ``Task.engines``) asks DeepSpeed for one engine per name, each configured from the
    launcher's DeepSpeed settings; the task selects one before preparing each model.
    """
    handlers, cpu = [], False
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched_world_size() > 1:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            cpu = not deepspeed
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.train.timeout_s)))
    if deepspeed and engines:
        kwargs["deepspeed_plugins"] = {name: DeepSpeedPlugin() for name in engines}
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracker_name(cfg),
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir)),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    for plugin in (accelerator.state.deepspeed_plugins or {}).values():
        # a WebLoader has no integer batch size for DeepSpeed to read
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    return accelerator
