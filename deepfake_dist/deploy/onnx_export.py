"""``deepfake-dist export --onnx``: an exported detector as ONNX, checked against PyTorch.

The graph is exported with ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis (input
``image`` (B, C, H, W) -> output ``logit`` (B,); a model that hears takes ``audio`` (B, samples)
too, or alone, and one with several heads gives ``logit`` (B, heads)), then run with onnxruntime
on real inputs: the test split of the model's own shard sets, or a folder of images preprocessed
exactly as the server does (``deploy.scorer.model_input``). The ``audio`` detector is the audio
encoder with its head: its graph starts from the waveform (the log-mel is convolutions and a
matrix product, see ``models.audio``). The largest absolute logit difference must be at most
``atol`` (1e-4), at batch 1 and at a larger batch, or the file is removed and the command fails.
Metadata goes next to it as ``NAME.json``: the model's JSON plus an ``onnx`` section.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from deepfake_dist.atomic import atomic_path, write_json_atomic
from deepfake_dist.data.imageio import is_image_file, open_image
from deepfake_dist.deploy.scorer import model_input
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.models import model_io
from deepfake_dist.models.exported import in_channels, load_exported
from deepfake_dist.options import ExportOptions

OUTPUT = "logit"
PARITY_IMAGES = 64


def parity_images(info: dict, images: str | Path | None, overrides: list[str] = ()) -> tuple[tuple[torch.Tensor, ...], str]:
    """Up to ``PARITY_IMAGES`` real model inputs (one tensor per input the model takes) and where
    they came from."""
    names = model_io(info["model"])[0]
    if images is not None and names != ("image",):
        raise UserError(f"--images {images}: a {info['model']} model takes {', '.join(names)}; leave --images out to "
                        "check it on the test split of its shard sets")
    if images is not None:
        folder = Path(images)
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))[:PARITY_IMAGES] if folder.is_dir() else []
        if not files:
            raise UserError(f"--images {folder}: no .jpg/.png/.webp/.bmp images found there")
        return (torch.stack([model_input(open_image(p), info) for p in files]),), str(folder)
    from deepfake_dist.data.loader import EvalOptions, eval_loader
    from deepfake_dist.deploy.compress import stored_config, test_sets

    cfg = stored_config(info, overrides)
    sets = test_sets(cfg)
    missing = [s for s in sets if not (Path(s) / "manifest.json").is_file()]
    if missing:
        raise UserError(f"shard set {missing[0]} (from the model's config) is not here for the parity check; "
                        f"pass --images FOLDER with a few real test images, or data.train=[...] where the shards are")
    batches, count = [], 0
    for batch in eval_loader(sets, "test", EvalOptions.from_data(cfg.data, in_channels(info))):
        batches.append(batch.inputs(names))
        count += len(batch)
        if count >= PARITY_IMAGES:
            break
    return tuple(torch.cat(parts)[:PARITY_IMAGES] for parts in zip(*batches)), f"test split of {', '.join(sets)}"


def onnx_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(opts: ExportOptions, atol: float = 1e-4) -> dict:
    """Write ``opts.onnx`` (.onnx) and its ``.json`` next to it; returns the ``onnx`` metadata
    section. ONNX Runtime must agree with PyTorch within ``atol`` (largest logit difference)."""
    checkpoint, out, opset = opts.checkpoint, Path(opts.onnx), opts.opset
    if out.suffix != ".onnx":
        raise UserError(f"--onnx {out}: the file name must end in .onnx, e.g. model.onnx")
    model, info = load_exported(checkpoint)
    names = model_io(info["model"])[0]
    inputs, source = parity_images(info, opts.images, opts.overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(inputs[0])
    example = tuple(x[:2] if n >= 2 else x.repeat(2, *[1] * (x.dim() - 1)) for x in inputs)
    with out_of_space_is_one_line(f"the ONNX model {out}", out.parent, OUTPUTS_WHOLE), \
            atomic_path(out) as tmp:  # published only once ONNX Runtime agrees with PyTorch
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every pass on stdout
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset, input_names=list(names),
                                        output_names=[OUTPUT], verbose=False,
                                        dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in names))
            program.save(str(tmp))
        session = onnx_session(tmp)
        with torch.no_grad():
            expected = model(*inputs).numpy()

        def run(part: slice) -> np.ndarray:
            return session.run(None, {name: x[part].numpy() for name, x in zip(names, inputs)})[0]

        got = np.concatenate([run(slice(0, 1)), run(slice(1, None))]) if n > 1 else run(slice(None))
        diff = float(np.abs(got - expected).max())
        if not diff <= atol:
            raise UserError(f"{out}: ONNX Runtime and PyTorch disagree by {diff:.2e} (> {atol:g}) on {source}; "
                            f"nothing written. Try another --opset")
    meta = {"file": out.name, "opset": opset, "input": names[0], "output": OUTPUT,
            "input_shape": ["batch", *inputs[0].shape[1:]], "dynamic_batch": True,
            **({"inputs": {name: ["batch", *x.shape[1:]] for name, x in zip(names, inputs)}} if len(names) > 1 else {}),
            "parity": {"images": n, "source": source, "max_abs_diff": diff, "atol": atol},
            "exported_from": str(checkpoint)}
    with out_of_space_is_one_line(str(out.with_suffix(".json")), out.parent, OUTPUTS_WHOLE):
        write_json_atomic(out.with_suffix(".json"), {**info, "onnx": meta})
    return meta


def load_onnx(path: str | Path) -> tuple[object, dict]:
    """(onnxruntime session, model JSON) for an ``.onnx`` file or a run folder holding ``model.onnx``."""
    path = Path(path)
    onnx_file = path / "model.onnx" if path.is_dir() else path
    info_file = onnx_file.with_suffix(".json")
    if onnx_file.suffix != ".onnx" or not onnx_file.is_file() or not info_file.is_file():
        raise UserError(f"{path}: no ONNX model there; create one with "
                        f"deepfake-dist export --checkpoint RUN --onnx {onnx_file.with_suffix('.onnx')}")
    import json

    info = json.loads(info_file.read_text())
    try:
        session = onnx_session(onnx_file)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise UserError(f"{onnx_file}: onnxruntime cannot load it ({str(e).splitlines()[0]}); re-export it") from None
    return session, info
