"""Build the Accelerator for any launch mode: CPU/gloo, one GPU, DDP, DeepSpeed, multi-node."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from deepfake_dist.config import Config
from deepfake_dist.engine.tracking import tracker_name
from deepfake_dist.errors import UserError


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(cfg: Config, engines: tuple[str, ...] = (), **kwargs) -> Accelerator:
    """Pick the process group for the launch mode.

    Without CUDA, Accelerate only forms a multi-process group when told ``cpu=True`` (then gloo);
    DeepSpeed on CPU instead needs ``DS_ACCELERATOR=cpu`` and an explicit gloo backend, and
    ``cpu=True`` would turn it off. The group's timeout is ``train.timeout_s``. ``engines``
    (a task's ``Task.engines``) asks DeepSpeed for one engine per name, each configured from the
    launcher's DeepSpeed settings; the task selects one before preparing each model.
    """
    _die_with_launcher()
    if launched_with_fsdp():  # its sharded state dicts would reach the export, the digests, the EMA
        raise UserError("the launcher asks for FSDP, which deepfake_dist does not run; shard the model with DeepSpeed "
                        "ZeRO-3 instead: accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml ...")
    handlers, cpu = [], False
    deepspeed = launched_with_deepspeed()
    if launched_world_size() > 1 or deepspeed:
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
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not deepspeed:
        raise UserError("fp16 mixed precision needs a GPU: on a CPU Accelerate would train in fp32 without a word; "
                        "set train.mixed_precision=bf16 (autocast on the CPU) or no (or pass --mixed_precision to the launcher)")
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:
        raise UserError(f"the launcher's gradient_accumulation_steps ({accelerator.gradient_accumulation_steps}) "
                        f"differs from train.grad_accum ({cfg.train.grad_accum}); remove it from the accelerate "
                        "config / command line (deepfake_dist takes it from train.grad_accum)")
    plugins = accelerator.state.deepspeed_plugins
    for plugin in (plugins.values() if isinstance(plugins, dict) else [plugins] if plugins else []):
        _fill_deepspeed_config(plugin.deepspeed_config, cfg, accelerator.mixed_precision)
    return accelerator


def _die_with_launcher() -> None:
    """Under torchrun (and so ``accelerate launch``) end this trainer when its launcher dies.
    torchrun starts trainers in sessions of their own, so a launcher killed with SIGKILL (or an
    out-of-memory kill) would leave them training on, writing checkpoints into the run folder
    that a relaunch is using; with this they go as a node's processes go when the node dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was gone before the request
        os._exit(1)


def _fill_deepspeed_config(ds: dict, cfg: Config, precision: str) -> None:
    """The DeepSpeed settings that belong to the experiment, not the launcher.

    A WebLoader has no integer batch size for DeepSpeed to read, so the micro batch is
    ``data.batch_size``; accumulation is ``train.grad_accum`` (Accelerate fills "auto" with it; a
    different number in the DeepSpeed config would silently win); clipping left at "auto" is
    ``train.grad_clip`` (0: none); ZeRO-3 must gather the full weights for the exported
    ``model.safetensors``. In bf16/fp16 DeepSpeed casts
    the weights but keeps buffers in fp32, which BatchNorm refuses (weights and running
    statistics must share a dtype), so buffers follow the weights unless the config says otherwise.
    """
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", cfg.train.grad_accum):
        raise UserError(f"the DeepSpeed config sets gradient_accumulation_steps: {accumulation} but train.grad_accum "
                        f"is {cfg.train.grad_accum}; set it to \"auto\" (deepfake_dist takes it from train.grad_accum)")
    if precision in ("bf16", "fp16"):
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.train.grad_clip or 0.0)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def plain_module(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """The model under every wrapper ``prepare`` added: DDP, a DeepSpeed engine, and the
    ``torch.compile`` of Accelerate's ``dynamo_backend``, whose ``_orig_mod.`` would otherwise
    prefix every key of an exported state dict (which a plain model then cannot load)."""
    return accelerator.unwrap_model(module, keep_torch_compile=False)


def broadcast_buffers(accelerator: Accelerator, modules) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), one broadcast per dtype. Each
    rank's forward updates them from its own batch; DDP syncs them only at the start of a
    training forward and DeepSpeed never, so without this the replicas drift apart and
    validation, the export and an EMA see different statistics on different ranks."""
    if accelerator.num_processes == 1:
        return
    buffers = [b for module in modules for b in plain_module(accelerator, module).buffers()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=0)
        for buffer, value in zip(group, flat.split([b.numel() for b in group])):
            buffer.copy_(value.view_as(buffer))


def cast_inputs_for_deepspeed(accelerator: Accelerator, modules) -> None:
    """Under DeepSpeed bf16/fp16 an engine holds half-precision weights and, unlike autocast,
    needs half-precision inputs (DeepSpeed's fp16 ``auto_cast`` covers fp16 only): cast every
    floating-point input of ``modules`` (the prepared engines) on its way in."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.mixed_precision not in ("bf16", "fp16"):
        return
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16

    def convert(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    def cast(module, args, kwargs):
        return tuple(convert(v) for v in args), {k: convert(v) for k, v in kwargs.items()}

    for module in modules:
        module.register_forward_pre_hook(cast, with_kwargs=True)
