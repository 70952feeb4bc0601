"""A video detector: a per-frame image backbone, then a sequence model over the frames.

Input clips are (B, T, C, H, W). ``features`` returns the per-frame sequence encoding laid out
as a map (B, D, T, 1) (time on the height axis); the classifier averages it over time. Both
heads depend on frame order (an LSTM by nature, the transformer through learned positions).
``gradcam_layer`` points into the frame backbone, so Grad-CAM gives one map per frame (B*T).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead
from deepfake_dist.models.pretrained import Pretrained
from deepfake_dist.registry import Registry

TEMPORAL_HEADS = Registry("temporal head")


@TEMPORAL_HEADS.register("lstm")
class LSTMHead(nn.Module):
    """Bidirectional LSTM over the frame vectors; any clip length (``max_frames`` unused)."""

    def __init__(self, in_dim: int, hidden: int, max_frames: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, frames: Tensor) -> Tensor:
        return self.lstm(frames)[0]


@TEMPORAL_HEADS.register("transformer")
class TransformerHead(nn.Module):
    """Project frame vectors to ``hidden``, add learned position embeddings (up to
    ``max_frames``), then a 2-layer pre-norm transformer encoder."""

    def __init__(self, in_dim: int, hidden: int, max_frames: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.project = nn.Linear(in_dim, hidden)
        self.position = nn.Parameter(torch.zeros(1, max_frames, hidden))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_dim = hidden

    def forward(self, frames: Tensor) -> Tensor:
        t = frames.shape[1]
        if t > self.position.shape[1]:
            raise ValueError(f"clip has {t} frames; this model was built with max_frames={self.position.shape[1]}")
        return self.encoder(self.project(frames) + self.position[:, :t])


class TemporalFeatures(nn.Module):
    def __init__(self, frames: nn.Module, head: nn.Module):
        super().__init__()
        self.frames, self.head = frames, head

    def forward(self, clip: Tensor) -> Tensor:
        if clip.ndim != 5:
            raise ValueError(f"the temporal detector takes clips (B, T, C, H, W), got shape {tuple(clip.shape)}")
        b, t = clip.shape[:2]
        vectors = self.frames(clip.flatten(0, 1)).mean((-2, -1)).unflatten(0, (b, t))
        return self.head(vectors).transpose(1, 2).unsqueeze(-1)


@MODELS.register("temporal", kind="detector", clips=True)  # takes clip sets (data.loader.clip_frames)
def temporal(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    backbone: str = "resnet18",
    head: str = "lstm",
    hidden: int = 128,
    max_frames: int = 64,
    backbone_args: dict[str, Any] | None = None,
) -> Detector:
    """``backbone``: any image detector in the registry, built with ``in_channels``,
    ``pretrained`` (its ImageNet weights or a file for that backbone) and ``backbone_args``;
    only its ``features`` are kept. ``head``: "lstm" or "transformer"."""
    if backbone == "temporal" or MODELS.meta(backbone)["kind"] != "detector":
        raise UserError(f"temporal backbone must be an image detector, not '{backbone}'")
    head_cls = TEMPORAL_HEADS.get(head)
    frame = MODELS.get(backbone)(in_channels=in_channels, pretrained=pretrained, **(backbone_args or {}))
    sequence = head_cls(frame.classifier.fc.in_features, hidden, max_frames)
    gradcam = "features.frames" + frame.gradcam_layer.removeprefix("features")
    return Detector(TemporalFeatures(frame.features, sequence), LogitHead(sequence.out_dim, dropout), gradcam)
