"""A two-node job (two launchers on loopback, one gloo process each) loses a rank to SIGKILL:
the other node ends non-zero well within ``train.timeout_s``, with one line naming the dead
rank, and relaunching the same command resumes from the last complete checkpoint. (A rank that
stalls instead is tests/faults/test_rank_failure.py.)"""

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


@pytest.mark.slow
def test_killed_rank_is_named_and_the_relaunch_resumes(face_shards, tmp_path):
    timeout_s, run = 30, tmp_path / "runs" / "job"
    script = smoke(face_shards, run.parent, run.name, "train.epochs=4", "checkpoint.every_steps=2",
                   f"train.timeout_s={timeout_s}")
    nodes = start_nodes(CPU_GLOO, script, ROOT, tmp_path)
    try:
        wait_until(lambda: complete_checkpoints(run), 240, nodes[0], "a first checkpoint")
        os.kill(worker_pids(nodes[1].pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - killed
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # its trainers die with it
            node.wait(timeout=60)
    log = (tmp_path / "node0.log").read_text(errors="replace")
    assert code != 0 and elapsed < timeout_s, log[-3000:]
    assert "error: rank 0: a collective failed" in log and "rank 1 stopped responding" in log, log[-3000:]

    last = complete_checkpoints(run)[-1]
    again = subprocess.run(accelerate(*CPU_GLOO, "--main_process_port", str(free_port()), *script), env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last} " in again.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["ranks agree"]
