"""What a loader worker hands to the training process: a ``Batch`` of uint8 images, stacked into
one of the worker's reusable shared-memory buffers (``HandOffRing``).

``default_collate`` in a worker stacks each hand-off into a new shared-memory file: the worker
then takes a page fault for every 4 KiB it writes (the kernel finds and zeroes a page) and the
training process one for every 4 KiB it reads, and both map and unmap the file (BENCHMARKS.md,
loader, has the cost). A ring of buffers mapped once by both sides pays that once per buffer.
And every tensor that crosses the queue costs each side a file-descriptor hand-shake, so a
hand-off (``HandOff``) carries its labels as a list and its images as a slot of the ring, the
buffer itself only until the training process holds it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.data import get_worker_info

from deepfake_dist.console import console
from deepfake_dist.data.common import ReadProblem
from deepfake_dist.errors import UserError


@dataclass
class Batch:
    image: torch.Tensor  # uint8 from a worker; float32, normalised, from ShardLoader
    label: torch.Tensor
    key: list[str]
    meta_json: list[bytes]  # each sample's json member, as read (b"{}" if it has none): see ``meta``
    problems: list[ReadProblem] = field(default_factory=list)  # met by the worker since its last batch
    slot: tuple[int, int] | None = None  # (worker, ring slot) the images are in, to free when done
    ended: str | None = None  # why the worker's stream gave up (no shard left to read), on its last, empty batch
    # what samples of sets with sound carry besides their frames (``data.audio.decode_extra``):
    # audio (B, N), has_audio (B,), label_video and label_audio (B,); empty for other sets
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def inputs(self, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The model inputs named (``image``, ``audio``), in that order."""
        return tuple(self.image if name == "image" else self.extra[name] for name in names)

    @property
    def meta(self) -> list[dict]:
        """Each sample's json, parsed here: only evaluation and conditional GANs read it, and
        parsing every sample in the workers would slow every loader for them (BENCHMARKS.md, loader)."""
        parsed = []
        for key, raw in zip(self.key, self.meta_json):
            try:
                parsed.append(json.loads(raw))
            except ValueError as err:
                raise UserError(f"sample {key}: its json member is not valid JSON ({err}); find the shard with "
                                "deepfake-dist shards verify and re-create the set") from None
        return parsed

    def to(self, device) -> Batch:
        return Batch(self.image.to(device, non_blocking=True), self.label.to(device, non_blocking=True), self.key,
                     self.meta_json, self.problems,
                     extra={k: v.to(device, non_blocking=True) for k, v in self.extra.items()})

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (``data.pin_memory`` on a GPU): without it
        a Batch stays in pageable memory and ``to(device, non_blocking=True)`` copies synchronously."""
        return Batch(self.image.pin_memory(), self.label.pin_memory(), self.key, self.meta_json, self.problems,
                     self.slot, self.ended, {k: v.pin_memory() for k, v in self.extra.items()})

    def __len__(self) -> int:
        return len(self.key)

    def split(self, size: int) -> list[Batch]:
        """Batches of ``size`` (views of this one's tensors); the problems go with the first."""
        return [Batch(self.image[i:i + size], self.label[i:i + size], self.key[i:i + size],
                      self.meta_json[i:i + size], self.problems if i == 0 else [],
                      extra={k: v[i:i + size] for k, v in self.extra.items()}) for i in range(0, len(self), size)]


def stack_extra(extras: tuple[dict[str, torch.Tensor], ...]) -> dict[str, torch.Tensor]:
    """The samples' extra tensors stacked by name (every sample of a stream has the same names)."""
    return {name: torch.stack([e[name] for e in extras]) for name in extras[0]} if extras else {}


def collate(samples: list[tuple], problems: list[ReadProblem] = (), ended: str | None = None) -> Batch:
    """Stack ``(image, label, key, meta_json, extra)`` samples into a Batch: what a stream yields
    without workers, or a worker with only problems to report (otherwise ``HandOffRing.collate``)."""
    if not samples:  # only problems to report (the stream stops at the first under on_error: raise)
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], [], list(problems), ended=ended)
    images, labels, keys, metas, extras = zip(*samples)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys), list(metas),
                 list(problems), extra=stack_extra(extras))


_RINGS: weakref.WeakValueDictionary[int, HandOffRing] = weakref.WeakValueDictionary()  # by id, to unpickle to
_ring_ids = itertools.count()


@dataclass
class HandOff:
    """A Batch on its way from a worker to the training process: pickled onto the DataLoader's
    queue, unpickled there as the Batch it stands for (``HandOffRing.received``)."""

    ring: int
    slot: tuple[int, int]
    size: int
    buffer: torch.Tensor | None  # the slot's buffer, only while the training process does not hold it
    labels: list[int]
    keys: list[str]
    meta_json: list[bytes]
    problems: list[ReadProblem]
    extra: dict[str, torch.Tensor]  # small (a clip's sound): sent as it is, not through the ring

    def __reduce__(self):
        return _received, (self.ring, self.slot, self.size, self.buffer, self.labels, self.keys, self.meta_json,
                           self.problems, self.extra)


def _received(ring: int, *hand_off) -> Batch:
    return _RINGS[ring].received(*hand_off)


class HandOffRing:
    """Per worker, ``prefetch_factor + 1`` shared-memory buffers that its hand-offs are stacked
    into in turn (each as large as the largest hand-off it has held). A worker marks a slot busy
    as it fills it; ``ShardLoader`` frees it (``done``) once it has split and normalised the
    hand-off. The training process keeps each buffer it receives (``held``), so the next
    hand-off in that slot names the slot instead of sending the buffer again. The DataLoader asks
    a worker for at most ``prefetch_factor`` hand-offs ahead (counting those received but not
    yet passed on) and the training process frees the one it holds before it takes the next, so
    with one slot more a worker does not wait; the flags make sure it never overwrites a
    hand-off still in use, whatever the request order. Outside a worker (``num_workers: 0``)
    nothing is handed over and ``collate`` is plain."""

    WAIT_WARNING_S = 60

    def __init__(self, workers: int, prefetch_factor: int = 2):
        self.slots = prefetch_factor + 1
        self.busy = torch.zeros(max(workers, 1), self.slots, dtype=torch.bool)
        self.held = torch.zeros_like(self.busy)  # the training process holds the slot's buffer
        if workers:  # the worker processes read and write them
            self.busy.share_memory_()
            self.held.share_memory_()
        self.parent = os.getpid()
        self.id = next(_ring_ids)
        _RINGS[self.id] = self
        self.buffers: dict[int, torch.Tensor] = {}  # in a worker: its slots' buffers, made on first use
        self.turn = 0
        self.mapped: dict[tuple[int, int], torch.Tensor] = {}  # in the training process: the buffers it holds

    def start_pass(self) -> None:
        """Called by a worker as it starts a pass over its stream: what it handed over before was
        consumed, or dropped with the DataLoader's previous iterator."""
        info = get_worker_info()
        if info is not None:
            self.busy[info.id] = False
            self.turn = 0

    def collate(self, samples: list[tuple], problems: list[ReadProblem] = (),
                ended: str | None = None) -> Batch | HandOff:
        info = get_worker_info()
        if info is None or not samples:
            return collate(samples, problems, ended)
        slot = self.turn
        self.turn = (self.turn + 1) % self.slots
        self._wait_until_free(info.id, slot)
        images, labels, keys, metas, extras = zip(*samples)
        buffer = self.buffers.get(slot)
        if buffer is None or len(buffer) < len(images) or buffer.shape[1:] != images[0].shape:
            buffer = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype).share_memory_()
            self.buffers[slot] = buffer
            self.held[info.id, slot] = False
        self.busy[info.id, slot] = True
        torch.stack(images, out=buffer[:len(images)])
        return HandOff(self.id, (info.id, slot), len(images), None if self.held[info.id, slot] else buffer,
                       list(labels), list(keys), list(metas), list(problems), stack_extra(extras))

    def received(self, slot: tuple[int, int], size: int, buffer: torch.Tensor | None, labels: list[int],
                 keys: list[str], meta_json: list[bytes], problems: list[ReadProblem],
                 extra: dict[str, torch.Tensor]) -> Batch:
        """In the training process (as the DataLoader unpickles a HandOff): the Batch."""
        if buffer is not None:
            self.mapped[slot] = buffer
            self.held[slot] = True
        return Batch(self.mapped[slot][:size], torch.tensor(labels, dtype=torch.long), keys, meta_json, problems,
                     slot, extra=extra)

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
        if batch.slot is not None:
            self.busy[batch.slot] = False

    def workers_started(self) -> None:
        """New worker processes make new buffers: forget the old ones."""
        self.mapped.clear()
        self.held.zero_()
