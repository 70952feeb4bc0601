"""The model behind the server: PyTorch weights from safetensors, or an ONNX Runtime session.

Either way the server sees the same thing: ``logits(inputs)`` for a stack of preprocessed
images, the model's JSON (``info``), and, when PyTorch weights are at hand, a model for
Grad-CAM. Nothing is ever unpickled: weights come through ``exported.load_exported``
(safetensors) or onnxruntime.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from deepfake_dist.errors import UserError


@dataclass
class ServedModel:
    info: dict
    backend: str  # "pytorch" | "onnxruntime"
    weights: Path
    parameters: int
    torch_model: torch.nn.Module | None = None  # for Grad-CAM (and scoring, with the PyTorch backend)
    session: object | None = None  # onnxruntime.InferenceSession
    lock: threading.Lock = field(default_factory=threading.Lock)  # one PyTorch forward/backward at a time

    @property
    def threshold(self) -> float:
        return float(self.info.get("threshold", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    @cached_property
    def version(self) -> str:
        """Short content hash of the weights file: changes whenever the served weights do."""
        digest = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:12]

    @torch.no_grad()
    def probabilities(self, inputs: torch.Tensor) -> list[float]:
        """P(fake) = sigmoid(logit / temperature), as ``deepfake-dist predict`` reports it."""
        if self.session is not None:
            logits = torch.from_numpy(self.session.run(None, {self.session.get_inputs()[0].name: inputs.numpy()})[0])
        else:
            with self.lock:
                logits = self.torch_model(inputs)
        return torch.sigmoid(logits.float() / self.temperature).tolist()

    def explain(self, inputs: torch.Tensor) -> torch.Tensor:
        """Grad-CAM heat maps (B, H, W) in [0, 1] (see ``evaluation.gradcam``)."""
        from deepfake_dist.evaluation.gradcam import gradcam

        if self.torch_model is None:
            raise UserError("explain needs the PyTorch weights (model.safetensors) next to the ONNX file")
        with self.lock:  # Grad-CAM hooks the model: one request at a time
            return gradcam(self.torch_model, inputs)


def load_served(checkpoint: str | Path, onnx: bool = False) -> ServedModel:
    """A detector from a run folder / ``.safetensors`` file, or with ``onnx`` from a run folder
    holding ``model.onnx`` / an ``.onnx`` file (its PyTorch weights are used for Grad-CAM when
    ``model.safetensors`` sits next to it)."""
    from deepfake_dist.models.exported import load_exported

    if not onnx:
        model, info = load_exported(checkpoint)
        _check_detector(info, checkpoint)
        weights = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
        return ServedModel(info, "pytorch", weights, sum(p.numel() for p in model.parameters()), torch_model=model)
    from deepfake_dist.deploy.onnx_export import load_onnx

    session, info = load_onnx(checkpoint)
    _check_detector(info, checkpoint)
    onnx_file = Path(checkpoint) / "model.onnx" if Path(checkpoint).is_dir() else Path(checkpoint)
    torch_model = None
    if onnx_file.with_suffix(".safetensors").is_file():
        torch_model, _ = load_exported(onnx_file.with_suffix(".safetensors"))
    parameters = sum(p.numel() for p in torch_model.parameters()) if torch_model else _onnx_weights(onnx_file)
    return ServedModel(info, "onnxruntime", onnx_file, parameters, torch_model, session)


def _check_detector(info: dict, checkpoint) -> None:
    if info.get("kind") != "detector":
        raise UserError(f"{checkpoint}: holds a {info.get('kind', 'unknown')} model; serve a detector's run folder")
    if info.get("model") == "temporal":
        raise UserError(f"{checkpoint}: a temporal (video clip) detector; the server scores single images, "
                        "use deepfake-dist predict for videos")


def _onnx_weights(path: Path) -> int:
    """Numbers stored in the graph's initializers (the weights, with any folded constants)."""
    import math

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(math.prod(t.dims) for t in graph.initializer)
