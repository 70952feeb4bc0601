"""An exported detector ready to score images: the one scorer behind ``predict``, ``explain``
and the HTTP server.

A ``Scorer`` holds the model's JSON (``info``) and its PyTorch weights from safetensors
(``models.exported.load_exported``) or, with ``onnx``, an ONNX Runtime session; nothing is ever
unpickled. ``input`` makes a PIL image the model's input with the training preprocessing
(``model_input``: prepare's crop and resize, then the eval transform), so every place that scores
a user's own image sees what training saw. Probabilities are ``sigmoid(logit / temperature)``
with the temperature ``evaluate`` fitted on validation (1 until then); an image is fake when its
probability is over the stored ``threshold``, as the metrics call it.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from deepfake_dist.data import imageio, transforms
from deepfake_dist.errors import UserError
from deepfake_dist.models.exported import in_channels, load_exported


def model_input(img: Image.Image, info: dict) -> torch.Tensor:
    """PIL image -> normalized float tensor (C, R, R) for the model described by ``info``: the
    same mode conversion and centred square crop + bicubic resize as ``prepare``
    (``data.imageio.preprocess``), then the same ``eval_transform`` as evaluation."""
    channels, resolution = in_channels(info), int(info["resolution"])
    face = imageio.preprocess(img, "L" if channels == 1 else "RGB", resolution)
    return transforms.eval_transform(resolution, channels, info["normalize"])(pil_to_tensor(face))


@dataclass
class Scorer:
    info: dict  # the model's JSON
    weights: Path  # the file scored with: .safetensors, or .onnx with a session
    model: torch.nn.Module | None  # the PyTorch model: scores without a session, and explains
    session: object | None = None  # onnxruntime.InferenceSession, scores when present
    lock: threading.Lock = field(default_factory=threading.Lock)  # one PyTorch forward/backward at a time

    @property
    def backend(self) -> str:
        return "pytorch" if self.session is None else "onnxruntime"

    @property
    def threshold(self) -> float:
        return float(self.info.get("threshold", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def verdict(self, probability: float) -> str:
        return "fake" if probability > self.threshold else "real"

    @cached_property
    def parameters(self) -> int:
        if self.model is not None:
            return sum(p.numel() for p in self.model.parameters())
        return _onnx_weights(self.weights)

    @cached_property
    def version(self) -> str:
        """Short content hash of the weights file: changes whenever the scored weights do."""
        digest = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:12]

    def input(self, image: Image.Image) -> torch.Tensor:
        return model_input(image, self.info)

    @torch.no_grad()
    def probabilities(self, inputs: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """P(fake) for a stack of model inputs (B, C, H, W), or clips (B, T, C, H, W), scored
        ``batch_size`` at a time (all at once by default)."""
        step = batch_size or len(inputs)
        logits = torch.cat([self._logits(inputs[i:i + step]) for i in range(0, len(inputs), step)])
        return torch.sigmoid(logits.float() / self.temperature)

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            name = self.session.get_inputs()[0].name
            return torch.from_numpy(self.session.run(None, {name: inputs.numpy()})[0])
        with self.lock:
            return self.model(inputs)

    def explain(self, inputs: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Grad-CAM heat maps (B, H, W) in [0, 1] of ``layer`` (default: the model's
        ``gradcam_layer``; see ``evaluation.gradcam``)."""
        from deepfake_dist.evaluation.gradcam import gradcam

        if self.model is None:
            raise UserError("explaining needs the PyTorch weights (model.safetensors) next to the ONNX file")
        with self.lock:  # Grad-CAM hooks the model: one at a time
            return gradcam(self.model, inputs, layer)


def load_scorer(checkpoint: str | Path, onnx: bool = False) -> Scorer:
    """A detector from a run folder / ``.safetensors`` file, or with ``onnx`` from a run folder
    holding ``model.onnx`` / an ``.onnx`` file (its PyTorch weights are used for Grad-CAM when
    ``model.safetensors`` sits next to it)."""
    if not onnx:
        model, info = load_exported(checkpoint)
        _check_detector(info, checkpoint)
        weights = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
        return Scorer(info, weights, model)
    from deepfake_dist.deploy.onnx_export import load_onnx

    session, info = load_onnx(checkpoint)
    _check_detector(info, checkpoint)
    onnx_file = Path(checkpoint) / "model.onnx" if Path(checkpoint).is_dir() else Path(checkpoint)
    model = None
    if onnx_file.with_suffix(".safetensors").is_file():
        model, _ = load_exported(onnx_file.with_suffix(".safetensors"))
    return Scorer(info, onnx_file, model, session)


def _check_detector(info: dict, checkpoint) -> None:
    if info.get("kind") != "detector":
        raise UserError(f"{checkpoint}: holds a {info.get('kind', 'unknown')} model, not a detector; "
                        "pass a detector's run folder or model.safetensors")


def _onnx_weights(path: Path) -> int:
    """Numbers stored in the graph's initializers (the weights, with any folded constants)."""
    import math

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(math.prod(t.dims) for t in graph.initializer)
