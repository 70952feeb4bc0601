"""One optimizer step of one model, and the NaN/inf skip every task's step takes.

A batch whose loss (or, without a loss scaler, gradient norm) is NaN/inf is skipped on every
rank alike (no update, gradients zeroed), so DDP replicas stay in step; the step returns
``{NONFINITE: flag}`` and the trainer counts these, stopping after ``train.max_nonfinite`` in a row.
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator

NONFINITE = "nonfinite"  # a train_step's logs: 1.0 (or a device flag) when it skipped its batch


def nonfinite_flag(accelerator: Accelerator, *values: torch.Tensor) -> torch.Tensor:
    """1.0 where any of ``values`` (losses, a gradient norm) is NaN/inf on any rank, else 0.0:
    a 0-dim tensor left on the device, so nothing waits for the GPU to compute it (a fused
    optimizer takes it as ``found_inf``, the trainer reads it at log steps). A collective: every
    rank must call it."""
    bad = torch.stack([~torch.isfinite(v).all() for v in values]).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum").clamp_(max=1)
    return bad.reshape(())


def nonfinite(accelerator: Accelerator, *values: torch.Tensor) -> bool:
    """``nonfinite_flag`` read now (one wait for the GPU), for steps that must decide on the host."""
    return bool(nonfinite_flag(accelerator, *values).item() > 0)


class OptimizerStep:
    """Accumulate, clip, step, schedule, for one prepared model and its optimizer.

    ``skip_on_device``: the optimizer is fused and nothing else scales or steps it (no GradScaler,
    no DeepSpeed); a NaN/inf loss or gradient norm then reaches it as ``found_inf`` and the
    update is skipped on the device, as the GradScaler makes it do, so no step waits for the
    GPU. Otherwise the loss is read before the backward that would apply it.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, opt, grad_clip: float | None,
                 skip_on_device: bool = False):
        self.accelerator, self.model, self.opt = accelerator, model, opt
        self.grad_clip, self.skip_on_device = grad_clip, skip_on_device
        self.sched = None  # set once the run's length is known
        self.window_bad = None  # a NaN/inf met in this accumulation window so far (a device flag)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def __call__(self, compute_loss: Callable[[], tuple[torch.Tensor, dict]]) -> dict[str, float | torch.Tensor]:
        """``compute_loss()`` runs the forward (inside the accumulation context, where DDP wants
        it) and returns the loss and extra values to log; the step's logs come back."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, logs = compute_loss()
            if not self.skip_on_device and nonfinite(acc, loss):  # before a backward that would apply it
                self.opt.zero_grad(set_to_none=True)
                return {NONFINITE: 1.0, "lr": self.lr()}
            acc.backward(loss)
            checks = [loss]
            if acc.sync_gradients and self.grad_clip:
                checks.append(acc.clip_grad_norm_(self.model.parameters(), self.grad_clip))  # inf gradients
            if self.skip_on_device:  # the loss and the gradient norm, on every rank alike, left on the GPU
                bad = logs[NONFINITE] = nonfinite_flag(acc, *checks)
                self.window_bad = bad if self.window_bad is None else torch.maximum(self.window_bad, bad)
                self.opt.optimizer.found_inf = self.window_bad  # the update is skipped where it is 1
            self.opt.step()
            if acc.sync_gradients:
                self.sched.step()
                self.window_bad = None
            self.opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), **logs, "lr": self.lr()}
