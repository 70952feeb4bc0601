"""Helpers for the scale-out tests (DeepSpeed, two "nodes" on loopback, SLURM stand-ins,
failures): real ``accelerate launch`` processes on this CPU, one thread each."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
TRAIN = str(ROOT / "launch" / "train.py")
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# DeepSpeed compiles its CPU ops (shared-memory all-reduce, CPU Adam) on first use into
# TORCH_EXTENSIONS_DIR. One folder per virtual environment: two checkouts sharing a home folder
# would otherwise rebuild each other's ops at every launch (a CPU-minute or more each time).
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path.home() / ".cache" / "torch_extensions" / f"venv-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TORCH_EXTENSIONS_DIR": EXTENSIONS,
       "COLUMNS": "500"}  # COLUMNS: rich wraps no line


def accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def smoke(shards: Path, runs: Path, name: str, *overrides: str) -> list[str]:
    """``launch/train.py`` on configs/smoke.yaml (6 steps an epoch on two ranks, a checkpoint
    every 4 steps) pointed at ``shards``, writing ``runs/name``."""
    return [TRAIN, "--config", SMOKE, f"data.train=[{shards}]", f"output_dir={runs}", f"name={name}",
            "wandb.mode=disabled", *overrides]


def port_listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A free port whose neighbour is free too (a launcher may take port + 1 for its store)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and not port_listening(port + 1):
            return port


def node_args(machine_rank: int, port: int, nodes: int = 2) -> list[str]:
    """One "node" of a multi-node launch on loopback, one process per node, as
    launch/slurm/train.sbatch starts them: c10d rendezvous hosted by node 0 (on one host every
    node would otherwise take itself for the host and race to bind the port)."""
    return ["--num_machines", str(nodes), "--num_processes", str(nodes), "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "c10d",
            "--rdzv_conf", f"is_host={str(machine_rank == 0).lower()}", "--dynamo_backend", "no"]


def start_nodes(launch_args: list[str], script: list[str], cwd: Path, logs: Path, nodes: int = 2,
                env: dict | None = None) -> list[subprocess.Popen]:
    """``nodes`` launchers as separate "machines" on 127.0.0.1, output in ``logs/node<N>.log``."""
    port = free_port()
    procs = []
    for rank in range(nodes):
        with open(logs / f"node{rank}.log", "w") as log:  # the launcher keeps its own copy
            procs.append(subprocess.Popen(accelerate(*launch_args, *node_args(rank, port, nodes), *script),
                                          env={**ENV, **(env or {})}, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def wait_until(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the training processes a launcher started (its children; their own
    DataLoader workers share the environment but are a generation further down)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            env = dict(line.split("=", 1) for line in (entry / "environ").read_text().split("\0") if "=" in line)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def logged_train_steps(run_dir: Path) -> list[int]:
    from deepfake_dist.engine.tracking import read_jsonl

    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/images_per_s" in r]


def optimizer_steps(checkpoint: Path) -> int:
    """The largest Adam ``step`` counter in a checkpoint's optimizer files: how many updates the
    optimizer state has seen (a resume that lost it starts again from 0)."""
    def steps(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "step" and isinstance(value, (int, float, torch.Tensor)):
                    yield int(value)
                else:
                    yield from steps(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from steps(value)

    files = [p for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin") and "optim" in p.name]
    assert files, f"no optimizer state under {checkpoint}"
    return max(s for f in files for s in steps(torch.load(f, map_location="cpu", weights_only=False)))
