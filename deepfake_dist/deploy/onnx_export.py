"""``deepfake-dist export --onnx``: an exported detector as ONNX, checked against PyTorch.

The graph is exported with ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis (input
``image`` (B, C, H, W) -> output ``logit`` (B,)), then run with onnxruntime on real images: the
test split of the model's own shard sets, or a folder of images preprocessed exactly as the
server does (``deploy.scorer.model_input``). The largest absolute logit difference must be at most
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
from deepfake_dist.models.exported import in_channels, load_exported
from deepfake_dist.options import ExportOptions

INPUT, OUTPUT = "image", "logit"
PARITY_IMAGES = 64


def parity_images(info: dict, images: str | Path | None, overrides: list[str] = ()) -> tuple[torch.Tensor, str]:
    """Up to ``PARITY_IMAGES`` real model inputs and where they came from."""
    if images is not None:
        folder = Path(images)
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))[:PARITY_IMAGES] if folder.is_dir() else []
        if not files:
            raise UserError(f"--images {folder}: no .jpg/.png/.webp/.bmp images found there")
        return torch.stack([model_input(open_image(p), info) for p in files]), str(folder)
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
        batches.append(batch.image)
        count += len(batch)
        if count >= PARITY_IMAGES:
            break
    return torch.cat(batches)[:PARITY_IMAGES], f"test split of {', '.join(sets)}"


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
    inputs, source = parity_images(info, opts.images, opts.overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, *[1] * (inputs.dim() - 1))
    with out_of_space_is_one_line(f"the ONNX model {out}", out.parent, OUTPUTS_WHOLE), \
            atomic_path(out) as tmp:  # published only once ONNX Runtime agrees with PyTorch
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every pass on stdout
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                        verbose=False)
            program.save(str(tmp))
        session = onnx_session(tmp)
        with torch.no_grad():
            expected = model(inputs).numpy()
        got = np.concatenate([session.run(None, {INPUT: inputs[:1].numpy()})[0],
                              session.run(None, {INPUT: inputs[1:].numpy()})[0]]) if len(inputs) > 1 else \
            session.run(None, {INPUT: inputs.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= atol:
            raise UserError(f"{out}: ONNX Runtime and PyTorch disagree by {diff:.2e} (> {atol:g}) on {source}; "
                            f"nothing written. Try another --opset")
    meta = {"file": out.name, "opset": opset, "input": INPUT, "output": OUTPUT,
            "input_shape": ["batch", *inputs.shape[1:]], "dynamic_batch": True,
            "parity": {"images": len(inputs), "source": source, "max_abs_diff": diff, "atol": atol},
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
