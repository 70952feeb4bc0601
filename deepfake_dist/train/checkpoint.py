"""Atomic training checkpoints (``save_state``) and the exported model.

A checkpoint is written by every rank into ``checkpoints/.tmp-step-N`` and renamed to
``checkpoints/step-N`` by the main process once all ranks are done, so a folder named
``step-N`` is always complete: a kill mid-write leaves only a ``.tmp-`` folder, which resume
ignores. The loop's own counters go in ``trainer_state.json`` (JSON, not a pickle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from deepfake_dist.errors import UserError

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "task_state.safetensors"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (``.tmp-`` folders from killed writes are not listed)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict, keep_last: int,
                    tensors: dict[str, torch.Tensor]) -> Path:
    """Save the full training state on all ranks (DeepSpeed needs every rank), then publish it."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step-{state['step']}"
    tmp = folder / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, chosen on rank 0 and broadcast so all ranks load the same."""
    if resume == "none":
        return None
    choice = [None]
    if accelerator.is_main_process:
        if resume == "auto":
            found = complete_checkpoints(run_dir)
            choice = [str(found[-1]) if found else None]
        else:
            if not (Path(resume) / STATE_FILE).is_file():
                raise UserError(f"checkpoint.resume: '{resume}' is not a complete checkpoint folder (no {STATE_FILE})")
            choice = [resume]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0]) if choice[0] else None


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The loop's counters and the task's extra tensors; models/optimizers are restored in place."""
    accelerator.load_state(str(path))
    tensors = load_file(str(path / TENSORS_FILE)) if (path / TENSORS_FILE).is_file() else {}
    return json.loads((path / STATE_FILE).read_text()), tensors


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def export_model(accelerator: Accelerator, model: torch.nn.Module, out_dir: Path, info: dict, name: str = "model") -> None:
    """Write ``name.safetensors`` (a plain full state dict, ZeRO-3 gathered) and ``name.json``."""
    state = accelerator.get_state_dict(model)  # collective under DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        tmp = out_dir / f".{name}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / f"{name}.safetensors")
        write_json_atomic(out_dir / f"{name}.json", info)
