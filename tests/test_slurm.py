"""launch/slurm/train.sbatch end to end under stand-ins for sbatch, srun and scontrol
(tests/slurm_standins, first on PATH) that run a two-node job on this machine: both "nodes"
train together, SLURM's pre-time-limit USR1 makes the trainers checkpoint and stop, the script
requeues the job, and the rerun resumes from that checkpoint and finishes."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scale_setup import ENV, ROOT, free_port, logged_train_steps, wait_until

STANDINS = Path(__file__).parent / "slurm_standins"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"


def test_sbatch_script_asks_slurm_for_what_preemption_needs():
    text = SBATCH.read_text()
    directives = re.findall(r"^#SBATCH\s+(--[\w-]+)", text, re.MULTILINE)
    for option in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--partition",
                   "--signal", "--requeue"):
        assert option in directives, option
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.MULTILINE)  # to the batch shell, ahead of the limit


@pytest.mark.slow
def test_two_node_job_is_preempted_requeued_and_resumes(face_shards, tmp_path):
    state, runs = tmp_path / "slurm", tmp_path / "runs"
    env = {**ENV, "PATH": os.pathsep.join([str(STANDINS), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "SLURM_STANDIN_DIR": str(state), "LAUNCH_CONFIG": "configs/accelerate/cpu_gloo.yaml",
           "PROCS_PER_NODE": "1", "MAIN_PORT": str(free_port())}
    submitted = subprocess.run(
        ["sbatch", f"--output={tmp_path}/job-%j.out", str(SBATCH), "configs/smoke.yaml", f"data.train=[{face_shards}]",
         f"output_dir={runs}", "name=slurm", "wandb.mode=disabled", "train.epochs=6", "train.log_every=1"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    job = submitted.stdout.split()[-1]
    run, log = runs / "slurm", tmp_path / f"job-{job}.out"

    def output() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    wait_until(lambda: (run / "metrics.jsonl").exists() or (state / f"job-{job}.status").exists(), 240,
               what="the first training step")
    os.kill(int((state / f"job-{job}.pid").read_text()), signal.SIGUSR1)  # what --signal=B:USR1 sends
    wait_until(lambda: (state / f"job-{job}.status").exists(), 400, what="the end of the job")

    status, restarts = (state / f"job-{job}.status").read_text().split()
    out = output()
    assert (status, restarts) == ("0", "1"), out[-6000:]
    assert "2 node(s) x 1 process(es)" in out and "requeued 1 times" in out
    stopped = int(re.search(r"stop requested: checkpoint written at step (\d+)", out).group(1))
    assert 0 < stopped < 36
    assert f"resuming from {run / 'checkpoints' / f'step-{stopped}'}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 36 and summary["ranks agree"] and len(summary["rank_digests"]) == 2
    assert logged_train_steps(run) == list(range(1, 37))  # every step once: stopped, then continued
