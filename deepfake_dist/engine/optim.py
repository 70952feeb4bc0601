"""Optimizers and learning-rate schedules from the config (torch's own implementations)."""

from __future__ import annotations

import math

import torch

from deepfake_dist.config import OptimConfig, SchedConfig


def build_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: torch's single-kernel implementation, which can also skip an update on the
    device (its ``found_inf``; see ``engine.step.OptimizerStep``). The implementation stays this
    run's choice when a checkpoint is loaded (torch would take the saved run's). Frozen
    parameters (a probe's backbone) are left out: no state is kept for what never trains."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=fused or None)
    else:
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        opt = cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)
    chosen = {key: opt.defaults[key] for key in ("fused", "foreach")}

    def keep_implementation(loaded: torch.optim.Optimizer) -> None:
        for group in loaded.param_groups:
            group.update(chosen)

    opt.register_load_state_dict_post_hook(keep_implementation)
    return opt


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int):
    """Per-optimizer-step schedule with linear warm-up (one-cycle has its own warm-up)."""
    if cfg.name == "onecycle":
        pct = min(max(cfg.warmup_steps / max(total_steps, 1), 0.01), 0.99) if cfg.warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total_steps, 1), pct_start=pct
        )
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "cosine":
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "step":
            return cfg.gamma ** ((step - warmup) // cfg.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
