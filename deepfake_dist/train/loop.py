"""The one training loop: every task (detector, GAN, autoencoder) runs through it.

It owns what all tasks share: the data stream, epochs and steps, throughput accounting,
validation and best-model export (validation split only), checkpoints and ``resume: auto``,
early stopping, and a clean checkpoint-and-exit on SIGTERM / SIGUSR1 (preemption).

And the faults a long run meets: unreadable data the loader skipped (counted over all ranks
as ``train/skipped_samples`` and ``train/unreadable_shards``), batches whose loss was NaN/inf
(skipped by the task on every rank, counted as ``train/nonfinite_steps``; ``train.max_nonfinite``
in a row stop the run with a checkpoint at the next log step). Everything that can be refused up
front (config, data, model) is refused before the run folder is created.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import torch
import yaml
from accelerate.utils import gather_object, set_seed

from deepfake_dist import __version__
from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.config import Config, TrainConfig, to_dict
from deepfake_dist.data.loader import manifest_ids, resolve_channels, train_loader
from deepfake_dist.data.manifest import shard_urls
from deepfake_dist.errors import UserError, out_of_space_is_one_line
from deepfake_dist.registry import closest
from deepfake_dist.tasks import NONFINITE, task_class
from deepfake_dist.train.checkpoint import (
    export_model,
    find_resume,
    load_checkpoint,
    save_checkpoint,
)
from deepfake_dist.train.heartbeat import watch_ranks
from deepfake_dist.train.runtime import (
    broadcast_buffers,
    cast_inputs_for_deepspeed,
    launched_world_size,
    make_accelerator,
    plain_module,
)
from deepfake_dist.console import console
from deepfake_dist.train.tracking import Tracker, start_trackers


class _StopRequest:
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


class _FaultCounts:
    """Problems each rank's loader met since the last sync; ``sync`` (a collective) adds every
    rank's to the run's totals in ``state``."""

    KEYS = ("skipped_samples", "unreadable_shards")

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.local = dict.fromkeys(self.KEYS, 0)

    def add(self, problems) -> None:
        for problem in problems:
            self.local["skipped_samples" if problem.sample else "unreadable_shards"] += 1

    def sync(self, state: dict) -> None:
        counts = torch.tensor([self.local[k] for k in self.KEYS], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        for key, value in zip(self.KEYS, counts.tolist()):
            state[key] += int(value)
        self.local = dict.fromkeys(self.KEYS, 0)


class _NonfiniteCount:
    """Batches a task skipped for a NaN/inf loss or gradient: each step's flag is a float or a
    device tensor (``Task.nonfinite_flag``), added up where it lives, so counting makes no step
    wait for the GPU; ``sync`` reads the counts (at log steps and checkpoints)."""

    def __init__(self, limit: int):
        self.limit, self.run, self.total, self.tripped = limit, 0.0, 0.0, False

    def add(self, flag) -> None:
        if not isinstance(flag, torch.Tensor) and not flag:  # a finite batch on the host's word: no GPU work
            self.run = 0.0
            return
        self.run = (self.run + flag) * flag  # batches in a row, back to 0 at a finite one
        self.total = self.total + flag
        self.tripped = self.tripped | (self.run >= self.limit)

    def sync(self, state: dict) -> bool:
        """Adds the skips since the last sync to ``state``; whether ``limit`` came in a row."""
        state["nonfinite_steps"] += int(self.total)
        self.total = 0.0
        return bool(self.tripped)


def _check_monitor(cfg: Config, reported: tuple[str, ...]) -> None:
    """``train.monitor`` must name a metric the task reports. The default, val/auroc, is left to
    fall back to the latest model where there is none (a generator without the Inception file)."""
    if cfg.train.monitor == TrainConfig.monitor or cfg.train.monitor.removeprefix("val/") in reported:
        return
    choices = [f"val/{name}" for name in reported]
    raise UserError(f"'train.monitor' is {cfg.train.monitor!r}, which a {cfg.model.name} run does not report"
                    f"{closest(cfg.train.monitor, choices)}; choose one of: {', '.join(choices)}")


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def train(cfg: Config) -> dict:
    """Train ``cfg`` to the end (or to a stop request); returns the final summary. When another
    rank dies or stalls, this one raises a ``GroupFailure`` that names it (see ``heartbeat``)."""
    with watch_ranks(int(os.environ.get("RANK", "0")), launched_world_size()):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    stop = _StopRequest()  # first: a preemption signal during start-up or resume is not fatal
    make_task = task_class(cfg)
    _check_monitor(cfg, make_task.metrics)
    accelerator = make_accelerator(cfg, engines=make_task.engines)
    set_seed(cfg.seed)
    run_dir = cfg.run_dir

    channels = resolve_channels(cfg.data, cfg.data.train)
    task = make_task(cfg, accelerator, channels)
    replicas = list(task.replicated_modules().values())
    cast_inputs_for_deepspeed(accelerator, replicas)
    loader, stream = train_loader(cfg.data, channels, accelerator.process_index, accelerator.num_processes, cfg.seed,
                                  accelerator.device)
    for shard_set in cfg.data.val or cfg.data.train:  # validation refuses a missing shard: now, not after an epoch
        shard_urls(shard_set, cfg.data.val_split)
    if accelerator.is_main_process:  # the run folder only once nothing more can be refused up front
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.wait_for_everyone()
    batches_per_epoch = stream.batches_per_worker * max(cfg.data.num_workers, 1)
    steps_per_epoch = max(batches_per_epoch // cfg.train.grad_accum, 1)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    task.set_total_steps(total_steps)

    state = {"epoch": 0, "step": 0, "batch": 0, "best": None, "best_step": None, "stale_epochs": 0,
             "skipped_samples": 0, "unreadable_shards": 0, "nonfinite_steps": 0}
    resume = find_resume(accelerator, run_dir, cfg.checkpoint.resume)
    if resume is not None:
        loaded, tensors = load_checkpoint(accelerator, resume)
        state.update(loaded)
        task.load_state_tensors(tensors)
        if accelerator.is_main_process:
            console.print(f"resuming from {resume} (epoch {state['epoch']}, step {state['step']})")

    manifests = manifest_ids(sorted(set(cfg.data.train + (cfg.data.val or []))))
    start_trackers(accelerator, cfg, {"manifests": manifests, "world_size": accelerator.num_processes})
    tracker = Tracker(accelerator, cfg, total_steps, state["step"])
    export_info = {
        **task.export_info(),
        "model": cfg.model.name,
        "model_args": cfg.model.args,
        "resolution": cfg.data.resolution,
        "normalize": cfg.data.normalize,
        "manifests": manifests,
        "config": to_dict(cfg),
        "package_version": __version__,
    }

    faults = _FaultCounts(accelerator)
    nonfinite = _NonfiniteCount(cfg.train.max_nonfinite)

    def checkpoint():
        faults.sync(state)
        nonfinite.sync(state)
        return save_checkpoint(accelerator, run_dir, state, cfg.checkpoint.keep_last, task.state_tensors())

    finished = state["step"] >= total_steps
    stopped_early = False
    while not finished and state["epoch"] < cfg.train.epochs:
        stream.set_epoch(state["epoch"])
        wait = compute = 0.0
        seen = 0
        tick = time.perf_counter()
        for index, batch in enumerate(loader):
            if index < state["batch"]:  # replay to the resume point of this epoch
                tick = time.perf_counter()
                continue
            faults.add(batch.problems)
            started = time.perf_counter()
            wait += started - tick
            logs = task.train_step(batch)
            broadcast_buffers(accelerator, replicas)
            tick = time.perf_counter()
            compute += tick - started
            seen += len(batch)
            state["batch"] = index + 1
            skipped = logs.pop(NONFINITE, 0.0)  # 1.0 or a device flag where the task skipped the batch
            nonfinite.add(skipped)
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            if state["step"] % cfg.train.log_every == 0 or state["step"] == total_steps:
                if nonfinite.sync(state):  # read here, not every step: no step waits for the GPU for it
                    saved = checkpoint()
                    tracker.close({"stopped at step": state["step"], "nonfinite steps": state["nonfinite_steps"]})
                    raise UserError(
                        f"stopped: the loss was NaN or inf in {cfg.train.max_nonfinite} batches in a row (each "
                        f"skipped; train.max_nonfinite is {cfg.train.max_nonfinite}); checkpoint written at {saved}; "
                        "lower optim.lr, set train.grad_clip or check the data, then rerun to resume")
                if float(skipped):  # a skipped batch has no loss to show
                    logs = {"lr": logs["lr"]}
                logs = {k: float(v) for k, v in logs.items()}  # the step's losses, read from the GPU only now
                rate = seen / max(wait + compute, 1e-9)
                faults.sync(state)
                logs.update({"images_per_s": rate * accelerator.num_processes, "images_per_s_per_rank": rate,
                             "data_wait_frac": wait / max(wait + compute, 1e-9), "epoch": state["epoch"],
                             **{k: state[k] for k in (*_FaultCounts.KEYS, "nonfinite_steps")}})
                tracker.log({f"train/{k}": v for k, v in logs.items()}, state["step"])
                tracker.advance(state["step"], state["epoch"],
                                {k: logs[k] for k in ("loss", "lr", "images_per_s") if k in logs})
                wait = compute = 0.0  # each log covers the steps since the previous one
                seen = 0
            task.after_step(state["step"], tracker)
            if cfg.checkpoint.every_steps and state["step"] % cfg.checkpoint.every_steps == 0:
                checkpoint()
            if stop.agreed(accelerator):
                checkpoint()
                if accelerator.is_main_process:
                    console.print(f"stop requested: checkpoint written at step {state['step']}; rerun to resume")
                tracker.close({"stopped at step": state["step"]})
                return {"stopped": True, **state}
            if state["step"] >= total_steps:
                finished = True
                break
            tick = time.perf_counter()  # logging and checkpoints are neither data wait nor compute

        metrics = task.validate()
        tracker.log({f"val/{k}": v for k, v in metrics.items()}, state["step"])
        value = metrics.get(cfg.train.monitor.removeprefix("val/"))
        if value is None or _improved(value, state["best"], cfg.train.monitor_mode):  # None: nothing to rank by
            state.update(best=value, best_step=state["step"], stale_epochs=0)
            for name, module in task.export_modules().items():
                with out_of_space_is_one_line(f"the exported model {run_dir / name}.safetensors", run_dir):
                    export_model(accelerator, module, run_dir, {**export_info, "step": state["step"],
                                                                "val_metrics": metrics}, name=name)
        else:
            state["stale_epochs"] += 1
        state["epoch"] += 1
        state["batch"] = 0
        if cfg.train.early_stopping and state["stale_epochs"] >= cfg.train.early_stopping:
            stopped_early = True
        if state["epoch"] % cfg.checkpoint.every_epochs == 0 or finished or stopped_early:
            checkpoint()
        if stopped_early:
            break

    digests = rank_digests(accelerator, task.replicated_modules())
    faults.sync(state)
    nonfinite.sync(state)
    summary = {"run": str(run_dir), "epochs": state["epoch"], "steps": state["step"],
               f"best {cfg.train.monitor}": state["best"], "best step": state["best_step"],
               "early stopped": stopped_early, "ranks agree": len(set(digests)) == 1,
               "skipped samples": state["skipped_samples"], "unreadable shards": state["unreadable_shards"],
               "nonfinite steps": state["nonfinite_steps"],
               **({"missing shards": stream.missing} if stream.missing else {})}
    if accelerator.is_main_process:
        with out_of_space_is_one_line(str(run_dir / "summary.json"), run_dir):
            write_json_atomic(run_dir / "summary.json", {**summary, "rank_digests": digests})
    tracker.close(summary)
    return summary


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
