"""Name the rank that broke a multi-process run.

When a rank dies, the others learn of it from a collective that fails at once ("connection
reset by peer"); when one stalls, from a collective that times out after ``train.timeout_s``.
Neither error says which rank it was. So every rank keeps a heartbeat in the launcher's
rendezvous store (the TCPStore that torchrun / ``accelerate launch`` serve at
``MASTER_ADDR:MASTER_PORT``): a daemon thread bumps the rank's counter once a second. When a
collective fails, a surviving rank watches the counters for a few seconds: a rank whose counter
stands still died or froze, and the error names it.
"""

from __future__ import annotations

import os
import re
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch

from deepfake_dist.errors import GroupFailure

PERIOD_S = 1.0
_STORE_TIMEOUT_S = 10  # a store call that gets no answer in this long fails
# where a process-group failure surfaces: c10d itself, and DDP's own collectives (its buffer
# broadcast before each forward times out with "Application timeout caused pair closure")
_GROUP_CODE = (f"torch{os.sep}distributed{os.sep}", f"torch{os.sep}nn{os.sep}parallel{os.sep}distributed.py")
_PREFIX = "deepfake_dist/heartbeat"


class Heartbeat:
    """This rank's counter in the launcher's store, bumped every ``PERIOD_S`` by a daemon thread."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        self._prefix = f"{_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._store = _connect()
        if self._store is not None:
            self._thread = threading.Thread(target=self._run, name="deepfake-dist-heartbeat", daemon=True)
            self._thread.start()

    def _count(self, rank: int, add: int = 0) -> int:
        with self._lock:
            return self._store.add(f"{self._prefix}/{rank}", add)

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self._count(self.rank, 1)
            except Exception:  # noqa: BLE001 - the store went away: silent_ranks() will say so
                return

    def silent_ranks(self, watch_s: float = 3 * PERIOD_S) -> list[int] | None:
        """Other ranks whose heartbeat stands still over ``watch_s``; None if the store is gone."""
        if self._store is None:
            return None
        others = [r for r in range(self.world) if r != self.rank]
        try:
            before = {r: self._count(r) for r in others}
            time.sleep(watch_s)
            return [r for r in others if self._count(r) == before[r]]
        except Exception:  # noqa: BLE001 - any store failure means the store's host is gone
            return None

    def close(self) -> None:
        """Stop the thread and wait for it: a daemon thread still inside the store's C++ call when
        the interpreter exits aborts the process ("terminate called without an active exception")
        after a run that succeeded."""
        self._stop.set()
        if self._store is not None:
            self._thread.join(timeout=PERIOD_S + _STORE_TIMEOUT_S)


def _connect():
    """A client of the launcher's store, or None when there is none to reach."""
    try:
        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                          is_master=False, wait_for_workers=False,
                                          timeout=timedelta(seconds=_STORE_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - KeyError, ValueError or a refused connection: no heartbeat
        return None


def from_collective(err: BaseException) -> bool:
    """Whether ``err`` (or an error it arose from) came out of the process group, not the task."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.distributed.DistError) or re.search(r"\bgloo\b|NCCL", str(err)):
            return True
        if any(part in frame.filename for frame in traceback.extract_tb(err.__traceback__) for part in _GROUP_CODE):
            return True
        err = err.__cause__ or err.__context__
    return False


def explain(beat: Heartbeat, err: BaseException) -> str:
    """The one line a surviving rank prints: what failed, which rank is to blame, what to do."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # drop gloo's source path
    head = f"rank {beat.rank}: a collective failed ({reason})"
    rerun = "rerun the same command to resume from the last complete checkpoint"
    silent = beat.silent_ranks()
    if silent is None:
        return (f"{head}, and the launcher's store at {beat.address} is gone too: the main node (the one "
                f"running rank 0) failed or its launcher exited; {rerun}")
    if silent:
        names = ", ".join(map(str, silent))
        return (f"{head}: rank {names} stopped responding (died or froze; its log or its node says why); "
                f"{rerun}")
    return (f"{head}; every other rank is still running, so one is stuck (data loading, a deadlock) "
            f"rather than dead; {rerun}")


@contextmanager
def watch_ranks(rank: int, world: int):
    """Run the body with a heartbeat; a failed collective inside becomes a ``GroupFailure`` that
    names the silent rank(s)."""
    if world < 2:
        yield
        return
    beat = Heartbeat(rank, world)
    try:
        yield
    except Exception as err:
        if not from_collective(err):
            raise
        raise GroupFailure(explain(beat, err)) from err
    finally:
        beat.close()
