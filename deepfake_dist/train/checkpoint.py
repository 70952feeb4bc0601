"""Atomic training checkpoints (``save_state``) and the exported model.

A checkpoint is written by every rank into ``checkpoints/.tmp-step-N`` and renamed to
``checkpoints/step-N`` by the main process once all ranks are done, so a folder named
``step-N`` is always complete: a kill mid-write leaves only a ``.tmp-`` folder, which resume
ignores (and removes). The trainer's ``RunState`` goes in ``trainer_state.json`` (JSON, not a
pickle), and ``checksums.json`` holds the sha256 of every file, so a checkpoint truncated or
changed since is noticed before it is loaded: ``resume: auto`` then falls back to the previous
one and says so. Nothing in a checkpoint is unpickled before ``torch.load(weights_only=True)``
has accepted it (DeepSpeed itself loads its files with ``weights_only=False``). A write that runs
out of space removes its ``.tmp-`` folder and stops with one line; older checkpoints stay.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from accelerate.utils import load as safe_torch_load  # weights_only=True plus numpy arrays (RNG states)
from rich.markup import escape
from safetensors.torch import load_file, save_file

from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.console import console
from deepfake_dist.data.manifest import file_sha256
from deepfake_dist.engine.runtime import plain_module
from deepfake_dist.errors import UserError, disk_full, disk_full_error
from deepfake_dist.models.exported import write_exported
from deepfake_dist.models.pretrained import pickled_global
from deepfake_dist.train.state import RunState

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "task_state.safetensors"
CHECKSUMS_FILE = "checksums.json"
PICKLED = (".bin", ".pkl", ".pt", ".pth", ".ckpt")  # what accelerate and DeepSpeed write with torch.save
# Test hook (fault injection): seconds to wait before a written checkpoint is published, so a
# test can kill the job while the checkpoint is still a .tmp- folder.
FAULT_DELAY_ENV = "DEEPFAKE_DIST_FAULT_CHECKPOINT_DELAY"
_STEP = re.compile(r"^step-(\d+)$")
_TMP = ".tmp-step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (``.tmp-`` folders from killed writes are not listed)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    """The step in a ``step-N`` folder's name."""
    return int(_STEP.match(checkpoint.name).group(1))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: RunState, keep_last: int,
                    tensors: dict[str, torch.Tensor]) -> Path:
    """Save the full training state on all ranks (DeepSpeed needs every rank), then publish it."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step-{state.step}"
    tmp = folder / f"{_TMP}{state.step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            write_json_atomic(tmp / STATE_FILE, state.state_dict())
            write_json_atomic(tmp / CHECKSUMS_FILE, checksums(tmp))
    except Exception as err:
        if not disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise disk_full_error(f"checkpoint {tmp}", folder, err, f"{kept}; free space and rerun to resume") from None
    if accelerator.is_main_process:
        time.sleep(float(os.environ.get(FAULT_DELAY_ENV, "0")))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (DeepSpeed writes subfolders), by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` must not be loaded, or None: a link in it, a file
    missing, truncated or changed since it was written, or a torch.save file that holds more than
    tensors (code). A link is refused wherever it points: ``rglob`` does not enter a linked
    folder, so the files behind it would be loaded (DeepSpeed's with ``weights_only=False``)
    without being vetted, and what a link points to can change between the check and the load."""
    link = _first_link(path)
    if link is not None:
        return f"{link.relative_to(path)} is a symbolic link; a checkpoint holds its own files only, refusing to load it"
    try:
        sums = json.loads((path / CHECKSUMS_FILE).read_text())
    except FileNotFoundError:
        return f"it has no {CHECKSUMS_FILE}"
    except (OSError, ValueError):
        sums = None
    if not isinstance(sums, dict):
        return f"{CHECKSUMS_FILE} is unreadable"
    for name, digest in sums.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its sha256 in {CHECKSUMS_FILE} (truncated or changed)"
    for file in sorted(p for p in path.rglob("*") if p.suffix in PICKLED and p.is_file()):
        try:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                safe_torch_load(file, map_location="cpu")
        except pickle.UnpicklingError as err:
            found = pickled_global(err)
            what = f"holds pickled Python objects ({found}), not only tensors" if found else "is not a torch.save file"
            return f"{file.relative_to(path)} {what}; refusing to load it"
        except Exception as err:  # noqa: BLE001 - any other failure to read: damaged
            return f"{file.relative_to(path)} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    return None


def _first_link(folder: Path) -> Path | None:
    """The first symbolic link under ``folder`` (to a file or a folder; linked folders not entered)."""
    for parent, folders, files in os.walk(folder):
        for name in sorted(folders + files):
            if (Path(parent) / name).is_symlink():
                return Path(parent) / name
    return None


def _deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its checkpoints (a loss scaler's numbers, the
    ZeRO stage enum), allowed so that ``weights_only=True`` can vet its files. Only when this
    process runs DeepSpeed (it is imported then); its files cannot be resumed without it anyway."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _choose_resume(run_dir: Path, resume: str) -> str | None:
    """Rank 0: remove half-written checkpoints, then pick and check the one to resume from."""
    for tmp in sorted(checkpoint_dir(run_dir).glob(f"{_TMP}*")):
        shutil.rmtree(tmp, ignore_errors=True)
        console.print(f"removed the half-written checkpoint {escape(str(tmp))} (its write was interrupted)",
                      soft_wrap=True)
    if resume == "none":
        return None
    if resume != "auto":
        if not (Path(resume) / STATE_FILE).is_file():
            raise UserError(f"checkpoint.resume: '{resume}' is not a complete checkpoint folder (no {STATE_FILE})")
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise UserError(f"checkpoint.resume: {resume} is damaged: {problem}; choose another checkpoint "
                            "folder, or checkpoint.resume: auto")
        _move_newer_aside(run_dir, Path(resume))
        return resume
    damaged = []
    for found in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(found)
        if problem is None:
            if damaged:
                console.print(f"falling back to the previous complete checkpoint {escape(str(found))}",
                              soft_wrap=True)
            return str(found)
        damaged.append(f"{found.name}: {problem}")
        console.print(f"[yellow]warning:[/yellow] checkpoint {escape(str(found))} is damaged: {escape(problem)}",
                      soft_wrap=True)
    if damaged:
        raise UserError(f"no intact checkpoint to resume from in {checkpoint_dir(run_dir)} ({'; '.join(damaged)}); "
                        "move that folder away to start afresh, or set checkpoint.resume: none")
    return None


def _move_newer_aside(run_dir: Path, resume: Path) -> None:
    """This run's checkpoints newer than an explicit resume point belong to the history the run
    goes back on: they move to ``checkpoints/abandoned-<time>/``, kept, but out of reach of
    pruning (which would keep them as the newest) and of a later ``resume: auto``."""
    step = int(json.loads((resume / STATE_FILE).read_text()).get("step", 0))
    newer = [p for p in complete_checkpoints(run_dir) if _step(p) > step and p.resolve() != resume.resolve()]
    if not newer:
        return
    aside = checkpoint_dir(run_dir) / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    while aside.exists():
        aside = aside.with_name(f"{aside.name}-1")
    aside.mkdir()
    for found in newer:
        os.replace(found, aside / found.name)
    console.print(f"moved the checkpoints newer than step {step} ({', '.join(p.name for p in newer)}) aside to "
                  f"{escape(str(aside))}, so that resume: auto never returns to them; delete that folder when "
                  "you no longer need it", soft_wrap=True)


def find_resume(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: chosen and checked on rank 0 (``auto`` skips damaged ones,
    saying which file of which checkpoint is wrong), then broadcast so all ranks load the same one
    or all raise the same error."""
    choice = [None, None]  # path, error
    if accelerator.is_main_process:
        try:
            choice[0] = _choose_resume(run_dir, resume)
        except UserError as err:
            choice[1] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    if choice[1]:
        raise UserError(choice[1])
    return Path(choice[0]) if choice[0] else None


def load_checkpoint(accelerator: Accelerator, path: Path, state: RunState) -> dict[str, torch.Tensor]:
    """Models and optimizers are restored in place, the counters into ``state``; returns the
    task's extra tensors."""
    accelerator.load_state(str(path))
    state.load_state_dict(json.loads((path / STATE_FILE).read_text()))
    return load_file(str(path / TENSORS_FILE)) if (path / TENSORS_FILE).is_file() else {}


def export_model(accelerator: Accelerator, model: torch.nn.Module, out_dir: Path, info: dict, name: str = "model") -> None:
    """Write ``name.safetensors`` (a plain full state dict, ZeRO-3 gathered) and ``name.json``.

    A DeepSpeed engine is read through ``get_state_dict``, a collective (every rank calls it;
    ZeRO-3 gathers); any other model, prepared or not (a GAN's EMA generator), is whole on every
    rank and is read under its wrappers, a compiled one's included."""
    if _deepspeed_engine(accelerator, model):
        state = accelerator.get_state_dict(model)
    else:
        state = plain_module(accelerator, model).state_dict()
    if accelerator.is_main_process:
        write_exported(state, out_dir, info, name)


def _deepspeed_engine(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)
