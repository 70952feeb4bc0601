"""The process group of a command that runs on every rank without training (prepare, generate,
evaluate, a pipeline): how it is formed, and how a launched rank closes it and leaves."""

from __future__ import annotations

import os
import sys


def distributed_state():
    """``accelerate.PartialState`` for this process: one process without a launcher, a gloo (CPU)
    or nccl (GPU) group under ``accelerate launch`` / torchrun.

    PartialState only picks gloo when asked for the CPU; without that, a launched process on a
    machine with no GPU silently becomes a world of one, and ranks would overwrite each other's
    shards. So: CPU when ``ACCELERATE_USE_CPU`` is set or no GPU is visible, and an error when the
    launcher's ``WORLD_SIZE`` disagrees with the state (one created earlier without ``cpu=True``).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but accelerate's state has {state.num_processes} process(es) "
            f"({state.distributed_type}); it was created before prepare() without cpu=True on a machine "
            "without a GPU: create it with PartialState(cpu=True) / Accelerator(cpu=True)"
        )
    return state


def close_process_group() -> None:
    """A launched command (prepare, evaluate, generate) leaves its gloo/NCCL group open, and the
    group's threads torn down at interpreter exit can abort a rank that finished its work
    ("terminate called without an active exception"). Training closes it itself."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End the process with ``code``. A rank of a multi-process launch (``WORLD_SIZE`` > 1) leaves
    with ``os._exit`` once the command has returned (its files written and closed, its process
    group destroyed), skipping the interpreter's and the C++ runtime's teardown, where a two-rank
    gloo run that had finished correctly could abort now and then ("terminate called without an
    active exception", SIGABRT, so the launcher reported the job failed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
