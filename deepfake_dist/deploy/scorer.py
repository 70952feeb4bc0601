"""An exported detector ready to score images and videos: the one scorer behind ``predict``,
``explain`` and the HTTP server.

A ``Scorer`` holds the model's JSON (``info``) and its PyTorch weights from safetensors
(``models.exported.load_exported``) or, with ``onnx``, an ONNX Runtime session; nothing is ever
unpickled. ``input`` makes a PIL image the model's input with the training preprocessing
(``model_input``: prepare's crop and resize, then the eval transform), so every place that scores
a user's own image sees what training saw. Probabilities are ``sigmoid(logit / temperature)``
with the temperature ``evaluate`` fitted on validation (1 until then); an image is fake when its
probability is over the stored ``threshold``, as the metrics call it.

A video is cut with ``data.faces`` exactly as ``prepare --source videos:`` cuts it (frame
sampling, face track, crop), with the settings the model's training sets recorded: a clip model
scores the clips, an image model ``frames`` evenly spaced face crops (frames with no face are
skipped and counted), and a model that hears (``audio``, ``av``) each clip's sound as ``prepare
--audio`` cut it, fitted to the length it was trained on. The video's probability is the mean
over its clips or frames (``evaluation.video.aggregate_scores``, as ``evaluate`` scores videos);
a model with several heads also gives each head's (the temperature applies to the first).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from deepfake_dist.data import imageio, transforms
from deepfake_dist.data.audio import clip_sounds, fit_length
from deepfake_dist.data.faces import cut_samples, options_from_settings, video_faces
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.video import aggregate_scores
from deepfake_dist.models import model_io
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

    @cached_property
    def io(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What the model takes (``image``, ``audio``) and what its logits are (``models.model_io``)."""
        return model_io(self.info["model"])

    def input(self, image: Image.Image) -> torch.Tensor:
        return model_input(image, self.info)

    def video_inputs(self, path: str | Path, frames: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """The model's inputs cut from a video (see the module docstring): clips (N, T, C, R, R)
        or face crops (N, C, R, R), and the clips' sound (N, samples) for a model that hears; and
        what was found (frames scored, sampled frames without a face, clips, clips without sound).
        A model of the sound alone scores the clips that have it; a video with none raises."""
        clip_len = self.info.get("frames")
        if clip_len:
            opts = options_from_settings(self.info.get("video"), frames=int(clip_len), frame_level=False)
        else:  # one face per frame
            opts = options_from_settings(self.info.get("video"), frames=1, clips_per_video=frames, sampling="uniform",
                                         frame_level=True, audio=False)
        faces = video_faces(str(path), opts)
        samples = cut_samples(faces, opts).samples
        found = {"frames": sum(len(s.meta["frames"]) for s in samples), "frames_without_face": faces.without_face,
                 **({"clips": len(samples)} if clip_len else {})}
        images = torch.stack([torch.stack([self.input(img) for img in s.image]) if clip_len else self.input(s.image)
                              for s in samples])
        names = self.io[0]
        if "audio" not in names:
            return (images,), found
        sounds = clip_sounds([s.meta["frames"] for s in samples], path, faces.fps)
        heard = torch.tensor([piece is not None for piece, _ in sounds])
        waves = torch.stack([fit_length(piece, int(self.info["audio"]["samples"])) for piece, _ in sounds])
        found["clips_without_sound"] = int((~heard).sum())
        if names == ("audio",):
            if not heard.any():
                raise ValueError(f"no clip has sound: {sounds[0][1]['audio_reason']}")
            return (waves[heard],), found
        return tuple(images if name == "image" else waves for name in names), found

    def score_video(self, path: str | Path, frames: int = 16, batch_size: int | None = None) -> dict[str, Any]:
        """A video's probability of fake (and each head's, for a model with several) and what
        ``video_inputs`` found (``frames``: face crops an image model scores; clip models score clips)."""
        inputs, found = self.video_inputs(path, frames)
        probabilities = self.head_probabilities(inputs, batch_size)
        pooled = [float(aggregate_scores(probabilities[:, i])) for i in range(probabilities.shape[1])]
        heads = self.io[1]
        return {"probability": pooled[0], **({"heads": dict(zip(heads, pooled))} if len(heads) > 1 else {}), **found}

    def probabilities(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int | None = None) -> torch.Tensor:
        """P(fake) of the first head for a stack of model inputs (B, C, H, W), clips (B, T, C, H, W),
        or a tuple of them for a model with several inputs, scored ``batch_size`` at a time."""
        return self.head_probabilities(inputs, batch_size)[:, 0]

    @torch.no_grad()
    def head_probabilities(self, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                           batch_size: int | None = None) -> torch.Tensor:
        """(B, heads) P(fake) of every head (see ``probabilities``)."""
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        n = len(inputs[0])
        step = batch_size or n
        logits = torch.cat([self._logits(tuple(x[i:i + step] for x in inputs)).float().reshape(-1, len(self.io[1]))
                            for i in range(0, n, step)])
        logits[:, 0] /= self.temperature
        return torch.sigmoid(logits)

    def _logits(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.session is not None:
            feeds = {spec.name: x.numpy() for spec, x in zip(self.session.get_inputs(), inputs)}
            return torch.from_numpy(self.session.run(None, feeds)[0])
        with self.lock:
            return self.model(*inputs)

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
