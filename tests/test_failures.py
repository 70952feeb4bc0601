"""A two-node job (two launchers on loopback, one gloo process each) loses a rank. Killed with
SIGKILL: the other node ends non-zero well within ``train.timeout_s``, with one line naming the
dead rank, and relaunching the same command resumes from the last complete checkpoint. Frozen
(SIGSTOP): the other node ends once the collective times out, naming the frozen rank."""

import json
import os
import signal
import subprocess
import time

import pytest
from scale_setup import (
    ACCELERATE_CONFIGS,
    ENV,
    ROOT,
    accelerate,
    free_port,
    smoke,
    start_nodes,
    wait_until,
    worker_pids,
)

from deepfake_dist.train.checkpoint import complete_checkpoints

CPU_GLOO = ["--config_file", str(ACCELERATE_CONFIGS / "cpu_gloo.yaml")]


def lose_rank_1(face_shards, tmp_path, sig: int, timeout_s: int):
    """Start the two-node job, send ``sig`` to rank 1 once a checkpoint exists; returns (script,
    run folder, node 0's exit code, seconds from the signal to node 0's exit, node 0's log)."""
    runs = tmp_path / "runs"
    script = smoke(face_shards, runs, "job", "train.epochs=6", "checkpoint.every_steps=2", f"train.timeout_s={timeout_s}")
    nodes = start_nodes(CPU_GLOO, script, ROOT, tmp_path)
    try:
        wait_until(lambda: complete_checkpoints(runs / "job"), 240, nodes[0], "a first checkpoint")
        victim = worker_pids(nodes[1].pid)[1]
        os.kill(victim, sig)
        hit = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - hit
    finally:
        for node in nodes:  # SIGSTOP leaves node 1 waiting on its frozen worker; end it
            if node.poll() is None:
                for pid in worker_pids(node.pid).values():
                    os.kill(pid, signal.SIGKILL)
                node.wait(timeout=60)
    return script, runs / "job", code, elapsed, (tmp_path / "node0.log").read_text(errors="replace")


@pytest.mark.slow
def test_killed_rank_is_named_and_the_relaunch_resumes(face_shards, tmp_path):
    timeout_s = 30
    script, run, code, elapsed, log = lose_rank_1(face_shards, tmp_path, signal.SIGKILL, timeout_s)
    assert code != 0 and elapsed < timeout_s, log[-3000:]
    assert "error: rank 0: a collective failed" in log and "rank 1 stopped responding" in log, log[-3000:]

    last = complete_checkpoints(run)[-1]
    again = subprocess.run(accelerate(*CPU_GLOO, "--main_process_port", str(free_port()), *script), env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last} " in again.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 36 and summary["ranks agree"]


@pytest.mark.slow
def test_frozen_rank_is_named_once_the_collective_times_out(face_shards, tmp_path):
    timeout_s = 20
    _, _, code, elapsed, log = lose_rank_1(face_shards, tmp_path, signal.SIGSTOP, timeout_s)
    assert code != 0 and timeout_s - 1 < elapsed < timeout_s + 20, (elapsed, log[-3000:])
    assert "error: rank 0: a collective failed" in log and "rank 1 stopped responding" in log, log[-3000:]
