"""int8 post-training quantization that really quantizes the convolutions.

``torch.quantization.quantize_dynamic(model, {Linear, Conv2d})`` (the reference document's
recipe) leaves every Conv2d in float: dynamic quantization has no kernels for convolutions.
Here convolutions get *static* quantization with FX graph mode (``prepare_fx`` -> calibrate on
training images -> ``convert_fx``, x86/fbgemm per-channel qconfig; conv+bn+relu are fused), and
Linear/LSTM get dynamic quantization (weights int8, activations quantized on the fly).

Some forwards cannot be traced by FX (shape checks or ``min`` over shapes in ``hybrid``, ``vit``
and ``temporal``). Then the largest traceable submodules are quantized instead (the hybrid's
two trunks and fusion, the ViT's patch embedding and encoder MLPs, the temporal model's frame
encoder and LSTM), and the untraceable glue stays float. ``quantized_layers`` reports what
happened, so a model that ends up without an int8 convolution is visible.

Saving: the converted model's state dict holds quantized tensors, which safetensors cannot
store; it is written with ``torch.save`` and read back with ``torch.load(weights_only=True)``
(no pickled code) into the same structure rebuilt from the model's JSON (``load_int8``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from deepfake_dist.atomic import atomic_path
from deepfake_dist.errors import UserError
from deepfake_dist.models.exported import build_model, in_channels

BACKEND = "x86"  # fbgemm kernels with x86 tuning
_PREPARED = "_int8_prepared"  # marks submodules that went through prepare_fx


def qconfig_mapping() -> QConfigMapping:
    """Static int8 for everything FX can quantize, dynamic for Linear and LSTM."""
    return (get_default_qconfig_mapping(BACKEND)
            .set_object_type(nn.Linear, default_dynamic_qconfig)
            .set_object_type(nn.LSTM, default_dynamic_qconfig))


def _inputs_of(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, tuple]:
    """The positional inputs each submodule receives in one forward pass (what FX needs): those
    of its first call, for a module called more than once (the ReLU of a ResNet bottleneck)."""
    seen: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's result would replace the inputs
        seen.setdefault(module, args)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _has_weights(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTM)) for m in module.modules())


def _prepare(module: nn.Module, inputs: dict[nn.Module, tuple]) -> nn.Module:
    """``prepare_fx`` the module if FX can trace it, else each child that carries weights."""
    if module not in inputs:  # never called in forward: leave it alone
        return module
    args = inputs[module]
    if not any(True for _ in module.children()):  # traced bare, a layer becomes a functional call
        module = nn.Sequential(module)
    try:
        prepared = _with_attributes(prepare_fx(module, qconfig_mapping(), example_inputs=args), module)
        setattr(prepared, _PREPARED, True)
        return prepared
    except Exception:  # noqa: BLE001 - torch.fx TraceError and friends: an untraceable forward
        if isinstance(module, (nn.LSTM, nn.MultiheadAttention)):
            return module
        for name, child in module.named_children():
            if _has_weights(child):
                setattr(module, name, _prepare(child, inputs))
        return module


def _with_attributes(traced: nn.Module, original: nn.Module) -> nn.Module:
    """A traced module keeps only what its own forward used, but an untraceable parent may read
    the original's plain attributes (timm's ViT reads ``patch_embed.grid_size``): carry them over."""
    for key, value in vars(original).items():
        if not key.startswith("_") and key != "training" and not hasattr(traced, key):
            setattr(traced, key, value)
    return traced


def _convert(module: nn.Module) -> nn.Module:
    if getattr(module, _PREPARED, False):
        return _with_attributes(convert_fx(module), module)
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


# Attention and transformer layers read their Linear weights directly (fast paths), which a
# dynamically quantized Linear no longer has: their insides stay float.
_KEEP_FLOAT = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _dynamic_rest(model: nn.Module) -> nn.Module:
    """Dynamic int8 for the Linear/LSTM layers still in float (inside untraceable glue)."""
    spec = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if type(child) in (nn.Linear, nn.LSTM):
                spec[prefix + name] = default_dynamic_qconfig
            elif not isinstance(child, _KEEP_FLOAT):
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8) if spec else model


def quantize_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """A CPU int8 copy of ``model`` (float, eval): static convolutions calibrated on the batches
    of ``calibration`` (training images, eval preprocessing), dynamic Linear/LSTM."""
    torch.backends.quantized.engine = BACKEND
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # torch.ao warns about its deprecation on every call
        warnings.simplefilter("ignore")
        model = _prepare(model, _inputs_of(model, example))
        batches = 0
        with torch.no_grad():
            for images in calibration:
                model(images)
                batches += 1
        if batches == 0:
            raise UserError("no calibration images: the training split of the model's shard sets is empty")
        return _dynamic_rest(_convert(model)).eval()


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """How many layers of each quantized kind, e.g. {"ConvReLU2d": 4, "dynamic.Linear": 1}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        module = type(m).__module__
        if module.startswith("torch.ao.nn.") and (".quantized" in module) and _has_kernel(m):
            kind = ("dynamic." if ".dynamic" in module else "") + type(m).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def _has_kernel(m: nn.Module) -> bool:
    """A layer with int8 weights (not the ``LinearPackedParams`` holder inside a Linear)."""
    packed = type(m).__name__.endswith("PackedParams")
    return not packed and any(hasattr(m, a) for a in ("weight", "_packed_params", "_all_weight_values"))


def quantized_convolutions(model: nn.Module) -> int:
    return sum(n for kind, n in quantized_layers(model).items() if "Conv" in kind and not kind.startswith("dynamic"))


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights+biases, non-zero ones) of a quantized model, read from its state dict."""
    total = nonzero = 0
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        for t in _tensors(value):
            if t.dim() == 0:  # activation scales and zero points
                continue
            t = t.int_repr() if t.is_quantized else t  # int8 weights are symmetric: zero is 0
            total += t.numel()
            nonzero += int(t.count_nonzero())
    return total, nonzero


def _tensors(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, torch.Tensor):
        yield value


def save_int8(model: nn.Module, path: str | Path) -> Path:
    """The quantized state dict, atomically (tmp + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def load_int8(path: str | Path, info: dict) -> nn.Module:
    """Rebuild the int8 structure from ``info`` (a model JSON) and load ``path`` without
    unpickling code (``weights_only=True``)."""
    torch.backends.quantized.engine = BACKEND
    model = build_model(info).eval()
    example = torch.zeros(example_shape(info, 2))
    with warnings.catch_warnings():  # deprecation, and observers that never saw data
        warnings.simplefilter("ignore")
        model = _dynamic_rest(_convert(_prepare(model, _inputs_of(model, example)))).eval()
        try:  # ScriptObject: the packed int8 LSTM weights (a torch C++ class, no Python code)
            with torch.serialization.safe_globals([torch.ScriptObject]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise UserError(f"{path}: cannot read the int8 weights ({type(e).__name__}: {e}); re-run compress") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{path}: int8 weights do not fit model '{info['model']}' ({str(e).splitlines()[0]})") from None
    return model


def example_shape(info: dict, batch: int) -> tuple[int, ...]:
    """Input shape of a detector described by a model JSON (a clip for ``temporal``)."""
    image = (in_channels(info), int(info["resolution"]), int(info["resolution"]))
    return (batch, 8, *image) if info["model"] == "temporal" else (batch, *image)
