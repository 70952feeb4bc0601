"""Fault 8, a rank that stalls: one of two gloo ranks is frozen (SIGSTOP) mid-training. The other
reports within ``train.timeout_s`` (plus the heartbeat's few seconds), naming the frozen rank
(``train.heartbeat``), the job ends non-zero, and the relaunch resumes from the last complete
checkpoint. A rank that dies is the scale-out suite's test (see docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from scale_setup import ENV, ROOT, accelerate, free_port, smoke, wait_until, worker_pids
from torch.distributed import TCPStore

from deepfake_dist.train.checkpoint import complete_checkpoints
from deepfake_dist.train.heartbeat import _PREFIX, PERIOD_S, Heartbeat

TIMEOUT_S = 10


@pytest.mark.slow
def test_stalled_rank_is_named_and_the_job_resumes(face_shards, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "stall"

    def command() -> list[str]:
        return accelerate("--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"),
                          "--main_process_port", str(free_port()),
                          *smoke(face_shards, runs, "stall", f"train.timeout_s={TIMEOUT_S}",
                                 "checkpoint.every_steps=2", "train.max_steps=8",
                                 "data.num_workers=0"))  # no loader processes: worker_pids finds the ranks alone

    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(command(), env=ENV, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_until(lambda: complete_checkpoints(run_dir), 180, job, "a first checkpoint")
        frozen = worker_pids(job.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        stalled_at = time.monotonic()
        wait_until(lambda: "stopped responding" in log.read_text(), 120, job, "a report of the stalled rank")
        reported_after = time.monotonic() - stalled_at
        os.kill(frozen, signal.SIGCONT)  # let the launcher's SIGTERM reach it now, not after its grace period
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert job.returncode != 0
    assert reported_after < TIMEOUT_S + 20, reported_after  # the timeout, the heartbeat watch, a loaded machine
    report = next(line for line in text.splitlines() if "stopped responding" in line)
    assert report.startswith("error: rank 0: a collective failed") and "rank 1 stopped responding" in report
    last = complete_checkpoints(run_dir)[-1]

    again = subprocess.run(command(), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {last}" in again.stdout + again.stderr


def test_the_heartbeat_thread_has_ended_when_the_run_ends(monkeypatch):
    """A heartbeat thread left inside the store's C++ call at interpreter exit aborted a rank
    that had finished its run (SIGABRT, exit code 1 for the whole job)."""
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    beat = Heartbeat(rank=1, world=2)
    wait_until(lambda: beat._count(1) >= 2, 30, None, "two heartbeats")
    beat.close()
    assert not beat._thread.is_alive()
    beats = store.add(f"{_PREFIX}/0/1", 0)
    time.sleep(2.5 * PERIOD_S)
    assert store.add(f"{_PREFIX}/0/1", 0) == beats  # no beat after close


@pytest.mark.parametrize("world, teardown", [("2", False), ("1", True)])
def test_a_launched_rank_ends_without_the_interpreters_teardown(tmp_path, world, teardown):
    """``engine.distributed.exit_process``: a rank of a multi-process launch leaves with ``os._exit`` once its
    command returned (the teardown is where finished gloo ranks now and then aborted), with the
    command's exit code; a lone process exits normally."""
    ran = tmp_path / "teardown-ran"
    code = ("import atexit, pathlib; from deepfake_dist.engine.distributed import exit_process; "
            f"atexit.register(pathlib.Path({str(ran)!r}).touch); exit_process(3)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": world}, timeout=120)
    assert done.returncode == 3 and ran.exists() == teardown
