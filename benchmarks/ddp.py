"""DDP scaling on CPU: total images/s of real training runs (``launch/train.py`` under
``accelerate launch --config_file configs/accelerate/cpu_gloo.yaml``, the platform's loop,
loader and gloo all-reduce) with one process against two, each with one thread
(``OMP_NUM_THREADS=1``) and the same per-process batch; scaling efficiency = rate(2) / (2 *
rate(1)).

The rate is measured from ``metrics.jsonl`` between the first logged step after warm-up and
the last: (images between them, all ranks) / (wall time between them).

    deepfake-dist bench ddp [--model cnn] [--steps 40] [--processes 1 2]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import (
    REPO,
    console,
    face_set,
    interleaved,
    machine,
    median_of,
    paired_ratio,
    parser,
    print_table,
    replicated_set,
    write_result,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> str:
    """The ``accelerate`` next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("accelerate")
    return str(local) if local.is_file() else shutil.which("accelerate") or "accelerate"


def _records(metrics: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl that is being written (train-step records only)."""
    if not metrics.is_file():
        return []
    lines = metrics.read_text().split("\n")[:-1]  # the last piece may be a line still being written
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def _tree_cpu(pid: int) -> float:
    """CPU seconds so far of a process and all its descendants (the launcher and the ranks)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
    except psutil.Error:
        pass
    return total


def run_training(processes: int, model: str, set_dir, steps: int, warmup: int, batch_size: int, workers: int,
                 run_dir: Path) -> dict:
    """One training run, watched while it runs: images/s of all ranks together between the
    records of step ``warmup`` and step ``steps``, per wall second and per CPU second of the
    launched processes (read when each record appears)."""
    name = f"ddp-{processes}"
    shutil.rmtree(run_dir / name, ignore_errors=True)
    command = [launcher(), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_gloo.yaml"),
               "--num_processes", str(processes), "--main_process_port", str(free_port()),
               str(REPO / "launch/train.py"), "--config", str(REPO / f"configs/{model}.yaml"),
               f"data.train=[{set_dir}]", "data.val=null", f"data.num_workers={workers}",
               f"data.batch_size={batch_size}", f"train.max_steps={steps}", "train.epochs=1",
               f"train.log_every={warmup}", "train.early_stopping=null", "sched.warmup_steps=0",
               "checkpoint.every_epochs=1", "checkpoint.resume=none", "wandb.mode=disabled",
               f"name={name}", f"output_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    metrics, cpu_at = run_dir / name / "metrics.jsonl", {}
    with open(run_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < deadline:
            # the watcher shares the cores with the ranks: read the CPU times only when a new
            # record appears (walking the process tree every poll would slow the ranks it times)
            for record in _records(metrics):
                if record["step"] not in cpu_at:
                    cpu_at[record["step"]] = _tree_cpu(proc.pid)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
    if proc.returncode:
        tail = (run_dir / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{tail}")
    records = {r["step"]: r for r in _records(metrics)}
    first, last = records[min(records)], records[max(records)]
    images = (last["step"] - first["step"]) * batch_size * processes
    cpu = cpu_at.get(last["step"], 0.0) - cpu_at.get(first["step"], 0.0)
    return {"per_s": images / (last["time"] - first["time"]), "per_cpu_s": images / cpu if cpu > 0 else None,
            "steps": [first["step"], last["step"]], "data_wait_frac": last.get("train/data_wait_frac")}


def main(argv=None) -> dict:
    p = parser("ddp", __doc__)
    p.add_argument("--model", default="cnn", help="configs/MODEL.yaml (a detector)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed window (also the log interval)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="per process")
    p.add_argument("--workers", type=int, default=0, help="data loader workers per process")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=1000, help="samples of the base set (replicated so no run ends "
                   "its first epoch)")
    args = p.parse_args(argv)
    if args.steps < 2 * args.warmup:
        p.error("--steps must be at least twice --warmup (the timed window needs two logged steps)")
    started = machine()
    copies = -(-args.steps * args.batch_size * max(args.processes) // args.samples) + 1
    set_dir = replicated_set(face_set(args.data, args.samples), copies)
    with tempfile.TemporaryDirectory() as tmp:
        def case(n):
            return lambda: run_training(n, args.model, set_dir, args.steps, args.warmup, args.batch_size, args.workers,
                                        Path(tmp))

        console.print(f"ddp: {args.model}, processes {args.processes}, {args.steps} steps x {args.repeats} rounds")
        runs = interleaved({str(n): case(n) for n in args.processes}, args.repeats)
    base = min(args.processes)
    results = {"model": args.model, "batch_size_per_process": args.batch_size, "workers": args.workers,
               "threads_per_process": 1, "processes": {}}
    rows = []
    for n in args.processes:
        speedup = paired_ratio(runs, str(n), str(base))
        cpu_runs = {k: [r for r in v if r["per_cpu_s"]] for k, v in runs.items()}
        row = {"images_per_s": median_of(runs[str(n)], "per_s"), "runs": runs[str(n)], "speedup": speedup,
               "efficiency": speedup / (n / base), "data_wait_frac": median_of(runs[str(n)], "data_wait_frac"),
               "images_per_cpu_s": median_of(cpu_runs[str(n)], "per_cpu_s") if cpu_runs[str(n)] else None,
               "cpu_efficiency": paired_ratio(cpu_runs, str(n), str(base), "per_cpu_s") if cpu_runs[str(n)] else None}
        results["processes"][str(n)] = row
        rows.append([str(n), row["images_per_s"], speedup, row["efficiency"], row["images_per_cpu_s"],
                     row["cpu_efficiency"], row["data_wait_frac"]])
    print_table(f"ddp: {args.model}, total images/s, 1 thread per process (medians of rounds; ratios: median "
                "of each round's ratio)",
                ["processes", "images/s", "speedup", "efficiency", "per CPU-s", "CPU efficiency", "data wait"], rows)
    write_result("ddp", args, results, started)
    return results


if __name__ == "__main__":
    main()
