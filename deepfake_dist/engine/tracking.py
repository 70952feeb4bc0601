"""What a run reports: a rich progress bar and summary (main process only), ``metrics.jsonl``
(always, no wandb needed) and wandb through Accelerate's trackers (online, offline or off)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from deepfake_dist.atomic import json_text
from deepfake_dist.config import Config, to_dict
from deepfake_dist.console import console
from deepfake_dist.errors import out_of_space_is_one_line


_live_bars: list[Progress] = []  # progress bars on screen: their locks are taken around a fork
_held = threading.local()  # the locks the forking thread took


def _hold_live_locks() -> None:
    """Before a fork (a data loader starting its workers): take the locks a live progress bar's
    refresh thread holds while it draws, the bar's then the console's (the order it takes them
    in), so that no child is born holding one. A child that inherits a held lock hangs at its
    first write to stderr, which the bar redirects through the console. rich has no public
    handle on these locks (``Live._lock``, ``Console._lock``)."""
    _held.locks = [lock for bar in _live_bars for lock in (bar.live._lock, bar.live.console._lock)]
    for lock in _held.locks:
        lock.acquire()


def _release_live_locks() -> None:
    """After the fork, in the parent and in the child (whose only thread is the one that forked)."""
    for lock in reversed(_held.locks):
        lock.release()


os.register_at_fork(before=_hold_live_locks, after_in_parent=_release_live_locks, after_in_child=_release_live_locks)


def tracker_name(cfg: Config) -> str | None:
    return None if cfg.wandb.mode == "disabled" else "wandb"


def start_trackers(accelerator: Accelerator, cfg: Config, extra: dict) -> None:
    if cfg.wandb.mode == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    accelerator.init_trackers(
        cfg.wandb.project,
        config={**to_dict(cfg), **extra},
        init_kwargs={
            "wandb": {
                "mode": cfg.wandb.mode,
                "entity": cfg.wandb.entity,
                "name": cfg.name,
                "dir": str(cfg.run_dir),
            }
        },
    )


class Tracker:
    """Fans one ``log(values, step)`` out to metrics.jsonl, wandb and the progress bar. A resumed
    run passes ``records``, the lines metrics.jsonl held at its checkpoint (``lines`` now): what
    was logged after the checkpoint is cut, as the run logs it again."""

    def __init__(self, accelerator: Accelerator, cfg: Config, total_steps: int, start_step: int,
                 records: int | None = None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.jsonl = cfg.run_dir / "metrics.jsonl"
        self.progress = None
        self.lines = 0
        if self.main:
            self.lines = _cut_lines(self.jsonl, records)
            self.progress = Progress(
                TextColumn("[bold]{task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console,
                disable=not console.is_terminal and not os.environ.get("DEEPFAKE_DIST_PROGRESS"),
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, epoch="", stats="")
            self.progress.start()
            _live_bars.append(self.progress)

    def log(self, values: dict, step: int) -> None:
        if self.main:
            record = {"step": step, "time": time.time(), **values}
            with out_of_space_is_one_line(str(self.jsonl), self.jsonl.parent), open(self.jsonl, "a") as f:
                f.write(json_text(record, indent=None) + "\n")
            self.lines += 1
        self.accelerator.log(values, step=step)

    def advance(self, step: int, epoch: int, stats: dict) -> None:
        if self.progress:
            text = "  ".join(f"{k} {v:.4g}" for k, v in stats.items())
            self.progress.update(self.task, completed=step, epoch=f"epoch {epoch}", stats=text)

    def close(self, summary: dict) -> None:
        if self.progress:
            _live_bars.remove(self.progress)
            self.progress.stop()
            table = Table(title="run summary")
            table.add_column("what")
            table.add_column("value", justify="right")
            for key, value in summary.items():
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
            console.print(table)
        self.accelerator.end_training()


def _cut_lines(path: Path, keep: int | None) -> int:
    """Cut ``path`` after its first ``keep`` lines (None: after its last whole one; a line a kill
    cut short always goes); returns the lines left. One ``truncate``, so a kill leaves the file
    as it was or as it is meant to be."""
    if not path.is_file():
        return 0
    offset = lines = 0
    with open(path, "rb") as f:
        for line in f:
            if lines == keep or not line.endswith(b"\n"):
                break
            offset, lines = offset + len(line), lines + 1
    if path.stat().st_size > offset:
        os.truncate(path, offset)
    return lines


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
