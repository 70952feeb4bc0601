"""What a loader worker hands to the training process: a ``Batch`` of uint8 images, stacked into
one of the worker's reusable shared-memory buffers (``HandOffRing``).

``default_collate`` in a worker stacks each hand-off into a new shared-memory file: the worker
then takes a page fault for every 4 KiB it writes (the kernel finds and zeroes a page) and the
training process one for every 4 KiB it reads, and both map and unmap the file, ~3 us a fault on
the benchmark VM, 4% of the 2-worker loader's time (BENCHMARKS.md, loader). A ring of buffers
mapped once by both sides pays that once per buffer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from torch.utils.data import default_collate, get_worker_info

if TYPE_CHECKING:
    from deepfake_dist.data.loader import ReadProblem

console = Console(stderr=True, highlight=False, soft_wrap=True)  # the data path's warnings, on every rank


@dataclass
class Batch:
    image: torch.Tensor  # uint8 from a worker; float32, normalised, from ShardLoader
    label: torch.Tensor
    key: list[str]
    meta: list[dict]
    problems: list[ReadProblem] = field(default_factory=list)  # met by the worker since its last batch
    slot: tuple[int, int] | None = None  # (worker, ring slot) the images are in, to free when done

    def to(self, device) -> Batch:
        return Batch(self.image.to(device, non_blocking=True), self.label.to(device, non_blocking=True), self.key,
                     self.meta, self.problems)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (``data.pin_memory`` on a GPU): without it
        a Batch stays in pageable memory and ``to(device, non_blocking=True)`` copies synchronously."""
        return Batch(self.image.pin_memory(), self.label.pin_memory(), self.key, self.meta, self.problems, self.slot)

    def __len__(self) -> int:
        return len(self.key)

    def split(self, size: int) -> list[Batch]:
        """Batches of ``size`` (views of this one's tensors); the problems go with the first."""
        return [Batch(self.image[i:i + size], self.label[i:i + size], self.key[i:i + size], self.meta[i:i + size],
                      self.problems if i == 0 else []) for i in range(0, len(self), size)]


def collate(samples: list[tuple], problems: list[ReadProblem] = (), out: torch.Tensor | None = None) -> Batch:
    """Stack ``(image, label, key, meta)`` samples into a Batch, the images into ``out`` if given
    (``default_collate`` otherwise, which in a worker stacks them into new shared memory)."""
    if not samples:  # only problems to report (the stream stops at the first under on_error: raise)
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], [], list(problems))
    images, labels, keys, metas = zip(*samples)
    stacked = torch.stack(images, out=out[:len(images)]) if out is not None else default_collate(images)
    return Batch(stacked, torch.tensor(labels, dtype=torch.long), list(keys), list(metas), list(problems))


class HandOffRing:
    """Per worker, ``prefetch_factor + 1`` shared-memory buffers that its hand-offs are stacked
    into in turn (each as large as the largest hand-off it has held). A worker marks a slot busy
    as it fills it; ``ShardLoader`` frees it (``done``) once it has split and normalised the
    hand-off, and keeps the buffer mapped, so the next hand-off in it arrives without a new
    mapping (torch's sharing code finds the mapping by the file's inode). The DataLoader asks a
    worker for at most ``prefetch_factor`` hand-offs ahead (counting those received but not yet
    passed on) and the training process frees the one it holds before it takes the next, so
    with one slot more a worker does not wait; the flags make sure it never overwrites a
    hand-off still in use, whatever the request order. Outside a worker (``num_workers: 0``)
    nothing is handed over and ``collate`` is plain."""

    WAIT_WARNING_S = 60

    def __init__(self, workers: int, prefetch_factor: int = 2):
        self.slots = prefetch_factor + 1
        self.busy = torch.zeros(max(workers, 1), self.slots, dtype=torch.bool).share_memory_()
        self.parent = os.getpid()
        self.buffers: dict[int, torch.Tensor] = {}  # in a worker: its slots' buffers, made on first use
        self.turn = 0
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}  # in the training process: buffers kept mapped

    def start_pass(self) -> None:
        """Called by a worker as it starts a pass over its stream: what it handed over before was
        consumed, or dropped with the DataLoader's previous iterator."""
        info = get_worker_info()
        if info is not None:
            self.busy[info.id] = False
            self.turn = 0

    def collate(self, samples: list[tuple], problems: list[ReadProblem] = ()) -> Batch:
        info = get_worker_info()
        if info is None or not samples:
            return collate(samples, problems)
        slot = self.turn
        self.turn = (self.turn + 1) % self.slots
        self._wait_until_free(info.id, slot)
        image = samples[0][0]
        buffer = self.buffers.get(slot)
        if buffer is None or len(buffer) < len(samples) or buffer.shape[1:] != image.shape:
            buffer = torch.empty((len(samples), *image.shape), dtype=image.dtype).share_memory_()
            self.buffers[slot] = buffer
        self.busy[info.id, slot] = True
        batch = collate(samples, problems, out=buffer)
        batch.slot = (info.id, slot)
        return batch

    def _wait_until_free(self, worker: int, slot: int) -> None:
        start, warned = time.monotonic(), False
        while self.busy[worker, slot]:
            if os.getppid() != self.parent:
                raise RuntimeError("the training process is gone")  # as the DataLoader's own watchdog
            time.sleep(0.001)
            if not warned and time.monotonic() - start > self.WAIT_WARNING_S:
                warned = True
                console.print(f"[yellow]warning:[/yellow] loader worker {worker} has waited {self.WAIT_WARNING_S} s "
                              f"for the training process to free hand-off slot {slot}; batches must be read "
                              "through the ShardLoader, which frees them")

    def done(self, batch: Batch) -> None:
        """In the training process, once ``batch`` (as a worker handed it over) is no longer read."""
        if batch.slot is None:
            return
        if batch.image.is_shared():  # not a pinned copy: keep the worker's buffer mapped
            self.mapped[batch.slot] = batch.image
        self.busy[batch.slot] = False

    def workers_started(self) -> None:
        """New worker processes make new buffers: forget the old ones' mappings."""
        self.mapped.clear()
