"""The audio-visual detector: a clip's frames and its sound, fused, with one logit per label.

``forward(clip, wave)`` takes a clip (B, T, C, H, W) and its waveform (B, N) and returns logits
(B, 3) for the labels in ``HEADS``: overall (the clip is fake), video (its frames are), audio (its
sound is). The frames go through a frame model's ``features`` (any registered image detector,
frame by frame, or the ``temporal`` model whole), the sound through the audio detector's trunk
(``models.audio``); each becomes a sequence of tokens over time, projected to ``dim``. Fusion
(``fusion``): ``concat`` pools each sequence over time; ``attention`` first lets each stream
attend to the other (cross-attention, residual, layer norm). The video head reads the video
stream, the audio head the audio stream, the overall head both, and, with ``sync``, the
audio-visual synchrony feature: the correlation over the clip between the mouth region's motion
from frame to frame and the change in the sound's loudness (a dubbed or cloned voice does not move
with the lips).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS, model_io
from deepfake_dist.models.audio import AudioFeatures
from deepfake_dist.models.pretrained import Pretrained
from deepfake_dist.registry import Registry

HEADS = ("overall", "video", "audio")
AV_FUSIONS = Registry("av fusion")
MOUTH_ROWS, MOUTH_COLS = (0.6, 0.9), (0.25, 0.75)  # of a face crop (prepare's margin around the box)


@AV_FUSIONS.register("concat")
class PooledFusion(nn.Module):
    """Each stream's tokens averaged over time."""

    def __init__(self, dim: int, heads: int):
        super().__init__()

    def forward(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        return video.mean(1), audio.mean(1)


@AV_FUSIONS.register("attention")
class CrossAttentionFusion(nn.Module):
    """Video tokens attend to the audio tokens and audio tokens to the video ones (residual,
    layer norm), then each stream is averaged over time."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.video_to_audio = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.audio_to_video = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.video_norm, self.audio_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        seen = self.video_norm(video + self.video_to_audio(video, audio, audio, need_weights=False)[0])
        heard = self.audio_norm(audio + self.audio_to_video(audio, video, video, need_weights=False)[0])
        return seen.mean(1), heard.mean(1)


def synchrony(clip: Tensor, wave: Tensor) -> Tensor:
    """(B, 1): Pearson correlation over the clip between the mouth region's mean absolute change
    from frame to frame and the change in loudness (RMS of the waveform's T equal parts); 0 when
    either does not vary."""
    b, t, _, h, w = clip.shape
    if t < 3:
        return clip.new_zeros(b, 1)
    mouth = clip[..., int(MOUTH_ROWS[0] * h):int(MOUTH_ROWS[1] * h), int(MOUTH_COLS[0] * w):int(MOUTH_COLS[1] * w)]
    motion = (mouth[:, 1:] - mouth[:, :-1]).float().abs().mean((2, 3, 4))  # (B, T-1)
    step = wave.shape[1] // t
    loudness = wave[:, :step * t].float().reshape(b, t, step).square().mean(-1).add(1e-12).sqrt()
    change = (loudness[:, 1:] - loudness[:, :-1]).abs()
    a, v = motion - motion.mean(1, keepdim=True), change - change.mean(1, keepdim=True)
    scale = (a.square().sum(1) * v.square().sum(1)).sqrt()
    return torch.where(scale > 1e-8, (a * v).sum(1) / scale.clamp(min=1e-8), torch.zeros_like(scale))[:, None]


class FrameTokens(nn.Module):
    """A clip -> one token per frame (B, T, D) from a frame model's ``features``: an image
    detector's map per frame, pooled; or the temporal model's sequence encoding (B, D, T, 1)."""

    def __init__(self, features: nn.Module, whole_clip: bool):
        super().__init__()
        self.features, self.whole_clip = features, whole_clip

    def forward(self, clip: Tensor) -> Tensor:
        if clip.ndim != 5:
            raise ValueError(f"the av detector takes clips (B, T, C, H, W), got shape {tuple(clip.shape)}")
        if self.whole_clip:
            return self.features(clip).squeeze(-1).transpose(1, 2)
        b, t = clip.shape[:2]
        return self.features(clip.flatten(0, 1)).mean((-2, -1)).unflatten(0, (b, t))


class AVDetector(nn.Module):
    """See the module docstring. ``gradcam_layer`` points into the frame model (one map per frame);
    ``audio_gradcam_layer`` into the audio trunk (a map over the spectrogram)."""

    def __init__(self, frames: FrameTokens, frame_dim: int, audio: AudioFeatures, dim: int, fusion: str, heads: int,
                 sync: bool, dropout: float, gradcam_layer: str):
        super().__init__()
        self.frames, self.audio = frames, audio
        self.video_proj, self.audio_proj = nn.Linear(frame_dim, dim), nn.Linear(audio.out_channels, dim)
        self.fusion = AV_FUSIONS.get(fusion)(dim, heads)
        self.sync = sync
        self.dropout = nn.Dropout(dropout)
        self.video_head, self.audio_head = nn.Linear(dim, 1), nn.Linear(dim, 1)
        self.overall_head = nn.Linear(2 * dim + int(sync), 1)
        self.gradcam_layer = gradcam_layer
        self.audio_gradcam_layer = "audio.blocks.3"

    def forward(self, clip: Tensor, wave: Tensor) -> Tensor:
        video = self.video_proj(self.frames(clip))
        audio = self.audio_proj(self.audio(wave).mean(2).transpose(1, 2))  # frequency pooled: (B, time, C)
        seen, heard = self.fusion(video, audio)
        both = [seen, heard, *([synchrony(clip, wave).to(seen.dtype)] if self.sync else [])]
        overall = self.overall_head(self.dropout(torch.cat(both, 1)))
        return torch.cat([overall, self.video_head(self.dropout(seen)), self.audio_head(self.dropout(heard))], 1)


@MODELS.register("av", kind="detector", clips=True, inputs=("image", "audio"), heads=HEADS)
def av(in_channels: int = 3, pretrained: Pretrained = False, frames: str = "cnn",
       frames_args: dict[str, Any] | None = None, audio_width: int = 16, n_mels: int = 64, dim: int = 64,
       fusion: str = "concat", heads: int = 4, sync: bool = False, dropout: float = 0.0) -> AVDetector:
    """``frames``: the frame model, any image detector in the registry or ``temporal``, built with
    ``in_channels``, ``pretrained`` and ``frames_args`` (only its ``features`` are kept);
    ``audio_width``, ``n_mels``: the audio trunk's (as the ``audio`` detector's ``width``, ``n_mels``);
    ``fusion``: ``concat`` or ``attention`` (``heads`` attention heads over ``dim``); ``sync``: add
    the synchrony feature to the overall head."""
    meta = MODELS.meta(frames)  # an unknown name is one line naming the closest
    if meta["kind"] != "detector" or model_io(frames)[0] != ("image",):
        raise UserError(f"av frames must be an image detector or temporal, not '{frames}'")
    AV_FUSIONS.get(fusion)
    frame = MODELS.get(frames)(in_channels=in_channels, pretrained=pretrained, **(frames_args or {}))
    whole_clip = bool(meta.get("clips"))
    gradcam = "frames.features" + frame.gradcam_layer.removeprefix("features")
    tokens = FrameTokens(frame.features, whole_clip)
    return AVDetector(tokens, frame.classifier.fc.in_features, AudioFeatures(audio_width, n_mels), dim, fusion, heads,
                      sync, dropout, gradcam)
