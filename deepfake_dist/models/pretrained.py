"""Load weights offline and without unpickling code.

``pretrained=True`` takes the published file (torchvision's or timm's ImageNet weights) from the
local torch hub cache (never the network) and says where to put it when it is missing; ``pretrained="PATH"`` reads a local
``.safetensors`` file, or a ``.pth``/``.pt`` through ``torch.load(weights_only=True)``, which
refuses pickled objects. Every mismatch is a one-line ``UserError`` that names the file.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from deepfake_dist.errors import UserError

Pretrained = bool | str | os.PathLike


@dataclass(frozen=True)
class HubFile:
    """A published weights file: where to fetch it, and its name in ``<torch hub dir>/checkpoints/``."""

    url: str
    name: str


# (module to fill, its published weights or None where none are, key prefix in the file to strip)
ImagenetPart = tuple[nn.Module, WeightsEnum | HubFile | None, str]


def imagenet_file(weights: WeightsEnum | HubFile, otherwise: str = "or set pretrained to false") -> Path:
    """The published file in ``<torch hub dir>/checkpoints/``, or a UserError that names the
    file, the folder, the URL to fetch it from and ``otherwise``, the other way out."""
    if isinstance(weights, WeightsEnum):
        weights = HubFile(weights.url, weights.url.rsplit("/", 1)[-1])
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / weights.name
    if not path.is_file():
        raise UserError(
            f"pretrained weights file '{weights.name}' is not in {folder} (nothing is downloaded): fetch "
            f"{weights.url} where there is network, save it as {path} (or point TORCH_HOME at a folder "
            f"whose hub/checkpoints holds it), {otherwise}"
        )
    return path


def pickled_global(err: pickle.UnpicklingError) -> str | None:
    """The Python object (e.g. ``posix.system``) whose pickle ``torch.load(weights_only=True)``
    refused to rebuild, or None when the file is simply not a torch file."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found[1] if found else None


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat name -> tensor mapping from ``.safetensors`` or a plain-tensor ``torch.save`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = pickled_global(e)
        if found:
            raise UserError(
                f"refusing to load {path}: it holds pickled Python objects ({found}), not only "
                f"tensors; save a plain state_dict or a .safetensors file"
            ) from None
        raise UserError(f"cannot read weights file {path}: not a torch.save file of tensors") from None
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, SafetensorError) as e:  # corrupt or foreign
        raise UserError(
            f"cannot read weights file {path}: not a .safetensors or torch.save file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"{path} is not a state dict (a flat mapping of parameter names to tensors)")
    return state


def load_pretrained(model: nn.Module, pretrained: Pretrained, name: str, imagenet: Sequence[ImagenetPart] = ()) -> None:
    """Fill ``model`` as ``pretrained`` says: False keeps the random init; True loads each
    ImageNet part from the hub cache; a path loads the whole model's state dict, or, for a model
    with one ImageNet backbone, that backbone's file in its library's format kept anywhere."""
    if pretrained is False or pretrained is None:
        return
    if pretrained is True:
        if not imagenet or any(weights is None for _, weights, _ in imagenet):
            raise UserError(
                f"model '{name}' has no ImageNet weights: set pretrained to false or to a "
                f"weights file (.safetensors or .pth)"
            )
        for module, weights, strip in imagenet:
            path = imagenet_file(weights)
            load_into(module, read_state_dict(path), path, strip)
        return
    path = Path(pretrained)
    state = read_state_dict(path)
    if len(imagenet) == 1 and missing_keys(model, state):
        module, _, strip = imagenet[0]
        load_into(module, state, path, strip, target="this model or its backbone")
    else:
        load_into(model, state, path)


def missing_keys(module: nn.Module, state: dict[str, Tensor]) -> list[str]:
    # old torchvision files predate BatchNorm's num_batches_tracked buffer
    return [k for k in module.state_dict() if k not in state and not k.endswith("num_batches_tracked")]


def load_into(
    module: nn.Module, state: dict[str, Tensor], source: Path, strip: str = "", target: str = "this model"
) -> None:
    """Copy ``state`` (keys minus ``strip``) into ``module``: every weight must be there with its
    shape; extra entries (an ImageNet head, layers a trunk does not use) are ignored. RGB first-conv
    kernels are summed for grey (1-channel) inputs (see ``fit_weight``)."""
    if strip:
        state = {k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
    missing = missing_keys(module, state)
    if missing:
        raise UserError(
            f"{source} does not fit {target}: {len(missing)} weights missing "
            f"(e.g. {', '.join(missing[:3])}); the file has {', '.join(list(state)[:3]) or 'no weights'}"
        )
    fitted = {}
    for key, want in module.state_dict().items():
        got = fit_weight(state[key], want.shape) if key in state else want
        if got.shape != want.shape:
            raise UserError(
                f"{source} does not fit {target}: '{key}' has shape {tuple(got.shape)}, "
                f"the model needs {tuple(want.shape)}"
            )
        fitted[key] = got
    module.load_state_dict(fitted)


def fit_weight(weight: Tensor, shape: torch.Size) -> Tensor:
    """A file's tensor in the layout the model needs, where only the layout differs: a 1x1 conv
    kernel stored as a matrix (Cadene's Xception file, the one FaceForensics++ and DeepfakeBench
    start from), or an RGB conv kernel for a conv with another number of input channels (the RGB
    sum shared equally, so a grey image repeated over the channels gives the RGB response)."""
    if weight.ndim == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1) and weight.shape == shape[:2]:
        return weight[:, :, None, None]
    if (
        weight.ndim == 4
        and len(shape) == 4
        and weight.shape[1] == 3
        and shape[1] != 3
        and weight.shape[0] == shape[0]
        and weight.shape[2:] == shape[2:]
    ):
        return weight.sum(1, keepdim=True).repeat(1, shape[1], 1, 1) / shape[1]
    return weight
