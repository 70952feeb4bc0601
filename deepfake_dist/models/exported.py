"""Load an exported model (``NAME.safetensors`` + ``NAME.json``) from a run folder or a file.

This is the only way models are loaded for evaluation, synthesis, compression and serving:
weights come from safetensors (never a pickle) and the architecture from the JSON, which
``write_exported`` wrote next to them (for the training loop, ``train.checkpoint.export_model``).
"""

from __future__ import annotations

import inspect
import json
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepfake_dist.atomic import atomic_path, write_json_atomic
from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS, create_model


def write_exported(state: dict[str, torch.Tensor], out_dir: Path, info: dict, name: str = "model") -> Path:
    """``out_dir/name.safetensors`` (on CPU, contiguous, as safetensors wants) and ``name.json``,
    each atomically; returns the weights' path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out_dir / f"{name}.json", info)
    return weights


def resolve(path: str | Path, name: str = "model") -> tuple[Path, Path]:
    """RUN_OR_FILE -> (weights, info): a run folder holds ``NAME.safetensors``; a file names itself."""
    path = Path(path)
    weights = path / f"{name}.safetensors" if path.is_dir() else path
    info = weights.with_suffix(".json")
    if weights.suffix != ".safetensors":
        raise UserError(f"{path}: models load from .safetensors files only (no pickles); pass a run folder or NAME.safetensors")
    for file in (weights, info):
        if not file.is_file():
            raise UserError(f"{file} not found; pass a run folder that finished training "
                            f"(it holds {name}.safetensors and {name}.json)")
    return weights, info


def load_info(path: str | Path, name: str = "model") -> dict:
    _, info = resolve(path, name)
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{info}: not valid JSON ({e}); re-export the model") from None


def in_channels(info: dict) -> int:
    """Input channels of an exported detector (its JSON keeps them in ``build_args``)."""
    return int(info.get("build_args", {}).get("in_channels") or info.get("in_channels", 3))


def load_exported(path: str | Path, name: str = "model") -> tuple[torch.nn.Module, dict]:
    """The model in eval mode on CPU, and its info (config, threshold, manifests, ...).

    ``info["module"]``, when present, names the part of the built model that was exported
    (e.g. ``generator`` of a GAN).
    """
    weights, _ = resolve(path, name)
    info = load_info(path, name)
    model = build_model(info)
    target = attrgetter(info["module"])(model) if info.get("module") else model
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: cannot read the weights ({e}); the file is damaged, re-export it") from None
    differences = mismatch(target.state_dict(), state)
    if differences:
        raise UserError(f"{weights}: weights do not fit model '{info['model']}' ({differences}); the weights and "
                        "their .json must come from the same export: export the run again")
    target.load_state_dict(state)
    return target.eval(), info


def build_model(info: dict) -> torch.nn.Module:
    """The architecture a model's JSON describes, reading no pretrained weights file (the export
    holds every weight, so a machine that serves the model need not have the files it started from)."""
    args = {**info.get("build_args", {}), **info.get("model_args", {})}
    if "pretrained" in inspect.signature(MODELS.get(info["model"])).parameters:
        args["pretrained"] = False
    return create_model(info["model"], **args)


def mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], show: int = 3) -> str:
    """What keeps ``found`` from loading where ``expected`` is, a few keys of each kind, or ""."""
    kinds = {
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected],
        "wrong shape": [f"{k} {tuple(found[k].shape)} where {tuple(v.shape)}" for k, v in expected.items()
                        if k in found and found[k].shape != v.shape],
    }
    return "; ".join(f"{len(keys)} {kind}: {', '.join(keys[:show])}{', ...' if len(keys) > show else ''}"
                     for kind, keys in kinds.items() if keys)
