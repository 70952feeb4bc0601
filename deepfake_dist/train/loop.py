"""The one trainer: every task (detector, GAN, autoencoder, distillation) runs through it.

It owns what all tasks share: the data stream, epochs and steps, throughput accounting,
validation and best-model export (validation split only), checkpoints and ``resume: auto``,
early stopping, and a clean checkpoint-and-exit on SIGTERM / SIGUSR1 (preemption).

And the faults a long run meets (``faults``): unreadable data the loader skipped (counted over
all ranks as ``train/skipped_samples`` and ``train/unreadable_shards``), batches whose loss was
NaN/inf (skipped by the task on every rank, counted as ``train/nonfinite_steps``;
``train.max_nonfinite`` in a row stop the run with a checkpoint at the next log step). Everything
that can be refused up front (config, data, model) is refused before the run folder is created.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object, set_seed

from deepfake_dist import __version__
from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.config import Config, to_dict
from deepfake_dist.console import console
from deepfake_dist.data.common import DataUnavailable
from deepfake_dist.data.loader import manifest_ids, resolve_channels, train_loader
from deepfake_dist.data.manifest import shard_urls
from deepfake_dist.engine.runtime import (
    broadcast_buffers,
    cast_inputs_for_deepspeed,
    launched_world_size,
    make_accelerator,
    plain_module,
)
from deepfake_dist.engine.step import NONFINITE
from deepfake_dist.engine.tracking import Tracker, start_trackers
from deepfake_dist.errors import UserError, out_of_space_is_one_line
from deepfake_dist.tasks import task_class
from deepfake_dist.train.checkpoint import checkpoint_dir, export_model, find_resume, load_checkpoint, save_checkpoint
from deepfake_dist.train.faults import FaultCounts, NonfiniteCount, StopRequest
from deepfake_dist.train.heartbeat import watch_ranks
from deepfake_dist.train.state import RunState


def train(cfg: Config) -> dict:
    """Train ``cfg`` to the end (or to a stop request); returns the final summary. When another
    rank dies or stalls, this one raises a ``GroupFailure`` that names it (see ``heartbeat``)."""
    with watch_ranks(int(os.environ.get("RANK", "0")), launched_world_size()):
        return Trainer(cfg).run()


class Trainer:
    """Setup (``__init__``), then per epoch ``train_epoch`` and ``end_epoch``, then ``finish``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop = StopRequest()  # first: a preemption signal during start-up or resume is not fatal
        make_task = task_class(cfg)
        self.accelerator = acc = make_accelerator(cfg, engines=make_task.engines)
        set_seed(cfg.seed)
        self.run_dir = cfg.run_dir
        channels = resolve_channels(cfg.data, cfg.data.train)
        self.task = make_task(cfg, acc, channels)
        self.replicas = list(self.task.replicated_modules().values())
        cast_inputs_for_deepspeed(acc, self.replicas)
        self.loader, self.stream = train_loader(cfg.data, channels, acc.process_index, acc.num_processes, cfg.seed,
                                                acc.device)
        for shard_set in cfg.data.val or cfg.data.train:  # validation refuses a missing shard: now, not after an epoch
            shard_urls(shard_set, cfg.data.val_split)
        self._start_run_folder()
        batches_per_epoch = self.stream.batches_per_worker * max(cfg.data.num_workers, 1)
        steps_per_epoch = max(batches_per_epoch // cfg.train.grad_accum, 1)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        self.task.set_total_steps(self.total_steps)
        self.state = RunState()
        self._resume()
        self._start_tracking()
        self.faults = FaultCounts(acc)
        self.nonfinite = NonfiniteCount(cfg.train.max_nonfinite)
        self.finished = self.state.step >= self.total_steps
        self.stopped_early = False

    def _start_run_folder(self) -> None:
        """The run folder, only once nothing more can be refused up front."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        resume = find_resume(self.accelerator, self.run_dir, self.cfg.checkpoint.resume)
        if resume is None:
            return
        self.task.load_state_tensors(load_checkpoint(self.accelerator, resume, self.state))
        if resume.parent.resolve() != checkpoint_dir(self.run_dir).resolve():
            self.state.metrics_lines = None  # another run's count: this run's metrics.jsonl is left as it is
        if self.accelerator.is_main_process:
            console.print(f"resuming from {resume} (epoch {self.state.epoch}, step {self.state.step})")

    def _start_tracking(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        manifests = manifest_ids(sorted(set(cfg.data.train + (cfg.data.val or []))))
        start_trackers(acc, cfg, {"manifests": manifests, "world_size": acc.num_processes})
        self.tracker = Tracker(acc, cfg, self.total_steps, self.state.step, self.state.metrics_lines)
        self.export_info = {**self.task.export_info(), "model": cfg.model.name, "model_args": cfg.model.args,
                            "resolution": cfg.data.resolution, "normalize": cfg.data.normalize,
                            "manifests": manifests, "config": to_dict(cfg), "package_version": __version__}

    def run(self) -> dict:
        if self.finished and self.state.batch:  # stopped or killed after its last step, before that epoch's end
            self.end_epoch()
        while not self.finished and self.state.epoch < self.cfg.train.epochs:
            stopped = self.train_epoch()
            if stopped is not None:
                return stopped
            if self.end_epoch():
                break
        return self.finish()

    def train_epoch(self) -> dict | None:
        """One pass over the loader from the epoch's resume point (the loader starts there,
        without making the batches before it); the summary of a run stopped on request."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.stream.set_epoch(state.epoch, state.batch)
        clock = _Throughput()
        for index, batch in enumerate(self._batches(), start=state.batch):
            self.faults.add(batch.problems)
            clock.compute_started()
            logs = self.task.train_step(batch)
            broadcast_buffers(acc, self.replicas)
            clock.compute_done(len(batch))
            state.batch = index + 1
            skipped = logs.pop(NONFINITE, 0.0)  # 1.0 or a device flag where the task skipped the batch
            self.nonfinite.add(skipped)
            if not acc.sync_gradients:
                continue
            state.step += 1
            if state.step % cfg.train.log_every == 0 or state.step == self.total_steps:
                self._log_step(logs, skipped, clock)
            self.task.after_step(state.step, self.tracker)
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                self.checkpoint()
            if self.stop.agreed(acc):
                return self._stop_on_request()
            if state.step >= self.total_steps:
                self.finished = True
                return None
            clock.restart()  # logging and checkpoints are neither data wait nor compute
        return None

    def _batches(self):
        """The loader's batches. When a rank's loader can read no more shards (``DataUnavailable``),
        every rank stops before its next step, with a checkpoint: the ranks agree on it before
        each batch (a rank without a batch cannot take part in the step's collectives)."""
        batches = iter(self.loader)
        while True:
            try:
                batch, failure = next(batches), None
            except StopIteration:
                return
            except DataUnavailable as err:
                batch, failure = None, err
            if self.accelerator.num_processes > 1:
                flag = torch.tensor([0.0 if failure is None else 1.0], device=self.accelerator.device)
                failed = self.accelerator.reduce(flag, reduction="sum").item() > 0
            else:
                failed = failure is not None
            if failed:
                saved = self.checkpoint()
                self.tracker.close({"stopped at step": self.state.step})
                why = str(failure) if failure is not None else "another rank could not read its training data"
                raise DataUnavailable(f"stopped: {why}; checkpoint written at {saved}")
            yield batch

    def _log_step(self, logs: dict, skipped, clock: _Throughput) -> None:
        state = self.state
        if self.nonfinite.sync(state):  # read here, not every step: no step waits for the GPU for it
            self._stop_on_nonfinite()
        if float(skipped):  # a skipped batch has no loss to show
            logs = {"lr": logs["lr"]}
        logs = {k: float(v) for k, v in logs.items()}  # the step's losses, read from the GPU only now
        rate, wait_frac = clock.read()
        self.faults.sync(state)
        logs.update({"images_per_s": rate * self.accelerator.num_processes, "images_per_s_per_rank": rate,
                     "data_wait_frac": wait_frac, "epoch": state.epoch, **state.faults()})
        self.tracker.log({f"train/{k}": v for k, v in logs.items()}, state.step)
        self.tracker.advance(state.step, state.epoch, {k: logs[k] for k in ("loss", "lr", "images_per_s") if k in logs})

    def _stop_on_nonfinite(self) -> None:
        limit = self.cfg.train.max_nonfinite
        saved = self.checkpoint()
        self.tracker.close({"stopped at step": self.state.step, "nonfinite steps": self.state.nonfinite_steps})
        raise UserError(f"stopped: the loss was NaN or inf in {limit} batches in a row (each skipped; "
                        f"train.max_nonfinite is {limit}); checkpoint written at {saved}; lower optim.lr, set "
                        "train.grad_clip or check the data, then rerun to resume")

    def _stop_on_request(self) -> dict:
        self.checkpoint()
        if self.accelerator.is_main_process:
            console.print(f"stop requested: checkpoint written at step {self.state.step}; rerun to resume")
        self.tracker.close({"stopped at step": self.state.step})
        return {"stopped": True, **self.state.state_dict()}

    def end_epoch(self) -> bool:
        """Validate, export the model when it is the best so far, checkpoint; whether to stop early."""
        cfg, state = self.cfg, self.state
        metrics = self.task.validate()
        self.tracker.log({f"val/{k}": v for k, v in metrics.items()}, state.step)
        value = metrics.get(cfg.train.monitor.removeprefix("val/"))
        if value is None or _improved(value, state.best, cfg.train.monitor_mode):  # None: nothing to rank by
            state.best, state.best_step, state.stale_epochs = value, state.step, 0
            self._export(metrics)
        else:
            state.stale_epochs += 1
        state.epoch += 1
        state.batch = 0
        if cfg.train.early_stopping and state.stale_epochs >= cfg.train.early_stopping:
            self.stopped_early = True
        if state.epoch % cfg.checkpoint.every_epochs == 0 or self.finished or self.stopped_early:
            self.checkpoint()
        return self.stopped_early

    def _export(self, metrics: dict) -> None:
        info = {**self.export_info, "step": self.state.step, "val_metrics": metrics}
        for name, module in self.task.export_modules().items():
            with out_of_space_is_one_line(f"the exported model {self.run_dir / name}.safetensors", self.run_dir):
                export_model(self.accelerator, module, self.run_dir, info, name=name)

    def checkpoint(self) -> Path:
        self.faults.sync(self.state)
        self.nonfinite.sync(self.state)
        self.state.metrics_lines = self.tracker.lines
        return save_checkpoint(self.accelerator, self.run_dir, self.state, self.cfg.checkpoint.keep_last,
                               self.task.state_tensors())

    def finish(self) -> dict:
        """The run's summary: printed, written to ``summary.json`` and returned."""
        state, acc = self.state, self.accelerator
        digests = rank_digests(acc, self.task.replicated_modules())
        self.faults.sync(state)
        self.nonfinite.sync(state)
        summary = {"run": str(self.run_dir), "epochs": state.epoch, "steps": state.step,
                   f"best {self.cfg.train.monitor}": state.best, "best step": state.best_step,
                   "early stopped": self.stopped_early, "ranks agree": len(set(digests)) == 1,
                   "skipped samples": state.skipped_samples, "unreadable shards": state.unreadable_shards,
                   "nonfinite steps": state.nonfinite_steps,
                   **({"missing shards": self.stream.missing} if self.stream.missing else {})}
        if acc.is_main_process:
            with out_of_space_is_one_line(str(self.run_dir / "summary.json"), self.run_dir):
                write_json_atomic(self.run_dir / "summary.json", {**summary, "rank_digests": digests})
        self.tracker.close(summary)
        return summary


class _Throughput:
    """Images per second and the share of time spent waiting for data, since the last log step."""

    def __init__(self):
        self.wait = self.compute = 0.0
        self.seen = 0
        self.restart()

    def restart(self) -> None:
        """What happened since the last mark is neither data wait nor compute."""
        self.tick = time.perf_counter()

    def compute_started(self) -> None:
        self.started = time.perf_counter()
        self.wait += self.started - self.tick

    def compute_done(self, images: int) -> None:
        self.tick = time.perf_counter()
        self.compute += self.tick - self.started
        self.seen += images

    def read(self) -> tuple[float, float]:
        """(images per second, data wait fraction); each log covers the steps since the previous one."""
        elapsed = max(self.wait + self.compute, 1e-9)
        rate, wait_frac = self.seen / elapsed, self.wait / elapsed
        self.wait = self.compute = 0.0
        self.seen = 0
        return rate, wait_frac


def _improved(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` of ``train.monitor`` beats ``best``. NaN ranks below every number: it
    never replaces a number, and a number always replaces it (or no best yet, None)."""
    if best is None or math.isnan(best):
        return True
    return not math.isnan(value) and (value > best if mode == "max" else value < best)


def rank_digests(accelerator, modules: dict) -> list[str]:
    """A hash of each rank's weights and buffers: replicas that drifted apart (a broken DDP
    setup, BatchNorm statistics under DeepSpeed) show up as different hashes. Under ZeRO-3 a
    rank's parameters are empty placeholders (its partition lives in the engine), so what is
    compared there is the buffers, which every rank holds whole."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        state = plain_module(accelerator, modules[name]).state_dict()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().float().cpu().numpy().tobytes())
    mine = [digest.hexdigest()]
    return gather_object(mine) if accelerator.num_processes > 1 else mine
