"""Grad-CAM for the detectors that hear (``audio``, ``av``): maps over the frames, for the video
head of ``av`` (its frame model's ``gradcam_layer``), and over the log-mel spectrogram, for the
audio head of ``av`` or the ``audio`` detector's logit (the audio trunk's last block); and the
figure ``evaluate`` draws of them. Each map explains the verdict of its own head, as
``evaluation.gradcam`` does for images.
"""

from __future__ import annotations

from operator import attrgetter
from pathlib import Path

import numpy as np
import torch

from deepfake_dist.data.transforms import denormalize
from deepfake_dist.evaluation import plots
from deepfake_dist.evaluation.gradcam import attribute, find_layer, overlay, scaled


def head_index(heads: tuple[str, ...], name: str) -> int | None:
    """Which logit explains ``name`` (None: the model's only one)."""
    return heads.index(name) if len(heads) > 1 else None


def frame_gradcam(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], head: int | None,
                  layer: str | None = None) -> torch.Tensor:
    """(B, T, H, W) maps over a clip's frames (``inputs``: the clip first, then the sound)."""
    _, module = find_layer(model, layer)
    clip = inputs[0]
    return scaled(attribute(model, inputs, module, head), clip.shape[-2:], clip.shape[:2])


def spectrogram_gradcam(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], head: int | None,
                        layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, log-mel) both (B, n_mels, frames): the maps of the audio trunk's ``layer`` over the
    spectrogram the model computed from the sound (the last input)."""
    name, module = find_layer(model, layer)
    logmel = attrgetter(name.rsplit(".blocks", 1)[0] + ".logmel")(model)
    with torch.no_grad():
        spectrogram = logmel(inputs[-1])[:, 0]
    return scaled(attribute(model, inputs, module, head), spectrogram.shape[-2:], spectrogram.shape[:1]), spectrogram


def spectrogram_picture(spectrogram: torch.Tensor, heat: torch.Tensor):
    """One log-mel (n_mels, frames) as a grey picture, low frequencies at the bottom, its map on top."""
    s = spectrogram.float().cpu()
    grey = ((s - s.min()) / (s.max() - s.min()).clamp(min=1e-6)).flip(0).numpy()
    return overlay(np.repeat(np.repeat(grey, 3, 0), 3, 1), heat.flip(0))  # 3x: readable at the grid's size


def sound_figures(out: Path, scored, inputs: tuple[torch.Tensor, ...], labels: list[int], keys: list[str],
                  names: tuple[str, ...], heads: tuple[str, ...], layer: str | None) -> dict[str, str]:
    """Grad-CAM grids of the examples (``inputs``, named ``names``): the middle frame of each clip
    (a model that also sees frames, for its video head) and each clip's spectrogram (for the
    audio head, or the ``audio`` detector's logit)."""
    model = scored.model
    score = dict(zip(scored.test.keys, scored.test.scores.tolist()))
    titles = [f"{('real', 'fake')[y]} p(fake)={score[k]:.2f}" for y, k in zip(labels, keys)]
    columns = max(len(keys) // 2, 1)
    figures = {}
    if "image" in names:
        heat = frame_gradcam(model, inputs, head_index(heads, "video"), layer)
        middle = inputs[0].shape[1] // 2
        shown = denormalize(inputs[0][:, middle], scored.info.get("normalize", "imagenet")).cpu()
        figures["gradcam"] = plots.image_grid(
            [overlay(img, h) for img, h in zip(shown, heat[:, middle])], titles, out / f"gradcam-{scored.run}.png",
            columns=columns, title=f"Grad-CAM of the video head on {layer or model.gradcam_layer} "
                                   "(middle frame; real clips first, then fakes)").name
    audio_layer = getattr(model, "audio_gradcam_layer", model.gradcam_layer)
    maps, spectrograms = spectrogram_gradcam(model, inputs, head_index(heads, "audio"), audio_layer)
    key = "spectrogram" if "image" in names else "gradcam"
    figures[key] = plots.image_grid(
        [spectrogram_picture(s, h) for s, h in zip(spectrograms, maps)], titles, out / f"{key}-{scored.run}.png",
        columns=columns, title=f"Grad-CAM of {'the audio head' if len(heads) > 1 else 'its logit'} on {audio_layer}, "
                               "over the log-mel spectrogram (real clips first, then fakes)").name
    return figures
