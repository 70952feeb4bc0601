"""A loader worker forked while the live progress bar draws must not be born holding the
console's lock: it would hang at its first write to stderr (the bar redirects stderr through the
console), and its loader with it. The bar is live only on a terminal, so the loaders run on a
pseudo-terminal (``live_loaders.py``)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import pytest

LOADERS = 25  # each forks two workers; before the fix, one of the first 13 hung in every trial


def _drain(fd: int) -> None:
    """Read the terminal's output until it closes, so that writes to it never block."""
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return
        except OSError:  # the other side closed
            return


@pytest.mark.slow
def test_loaders_started_under_a_live_progress_bar_never_hang(face_shards, tmp_path):
    runs = tmp_path / "runs"
    master, terminal = pty.openpty()
    script = Path(__file__).parent / "live_loaders.py"
    job = subprocess.Popen([sys.executable, str(script), str(face_shards), str(runs), str(LOADERS)],
                           stdin=terminal, stdout=terminal, stderr=terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(terminal)
    threading.Thread(target=_drain, args=(master,), daemon=True).start()
    try:
        code = job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
        code = None
    finally:
        os.close(master)
    started = int((runs / "started").read_text()) if (runs / "started").exists() else 0
    assert code == 0 and started == LOADERS, f"exit {code}: hung after {started} of {LOADERS} loaders"
