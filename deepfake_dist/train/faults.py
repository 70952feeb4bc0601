"""The faults a long run meets, counted so that every rank acts on them alike: a stop request
(SIGTERM / SIGUSR1, a preemption), unreadable data the loader skipped, and batches a task
skipped for a NaN/inf loss."""

from __future__ import annotations

import signal

import torch

from deepfake_dist.train.state import RunState


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1; ranks agree on it at each step so all stop together."""

    def __init__(self):
        self.asked = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.asked = True

    def agreed(self, accelerator) -> bool:
        flag = torch.tensor([1.0 if self.asked else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0) if accelerator.num_processes > 1 else self.asked


class FaultCounts:
    """Problems each rank's loader met since the last sync; ``sync`` (a collective) adds every
    rank's to the run's totals in ``state``."""

    KEYS = ("skipped_samples", "unreadable_shards")

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.local = dict.fromkeys(self.KEYS, 0)

    def add(self, problems) -> None:
        for problem in problems:
            self.local["skipped_samples" if problem.sample else "unreadable_shards"] += 1

    def sync(self, state: RunState) -> None:
        counts = torch.tensor([self.local[k] for k in self.KEYS], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        for key, value in zip(self.KEYS, counts.tolist()):
            setattr(state, key, getattr(state, key) + int(value))
        self.local = dict.fromkeys(self.KEYS, 0)


class NonfiniteCount:
    """Batches a task skipped for a NaN/inf loss or gradient: each step's flag is a float or a
    device tensor (``engine.step.nonfinite_flag``), added up where it lives, so counting makes no
    step wait for the GPU; ``sync`` reads the counts (at log steps and checkpoints)."""

    def __init__(self, limit: int):
        self.limit, self.run, self.total, self.tripped = limit, 0.0, 0.0, False

    def add(self, flag) -> None:
        if not isinstance(flag, torch.Tensor) and not flag:  # a finite batch on the host's word: no GPU work
            self.run = 0.0
            return
        self.run = (self.run + flag) * flag  # batches in a row, back to 0 at a finite one
        self.total = self.total + flag
        self.tripped = self.tripped | (self.run >= self.limit)

    def sync(self, state: RunState) -> bool:
        """Adds the skips since the last sync to ``state``; whether ``limit`` came in a row."""
        state.nonfinite_steps += int(self.total)
        self.total = 0.0
        return bool(self.tripped)
