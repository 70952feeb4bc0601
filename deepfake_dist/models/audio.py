"""The audio detector: a clip's waveform -> log-mel spectrogram -> a small CNN -> one logit (its
sound is fake). It trains on the sound alone, and its trunk is the audio encoder of ``av``.

The log-mel is computed here with torch (torchaudio has no wheel for the torch this project
runs on): the short-time Fourier transform is a strided convolution with a Hann-windowed DFT basis
(25 ms windows every 10 ms at 16 kHz, centred as ``torch.stft(center=True)`` pads them), then the
power spectrum goes through a triangular mel filterbank on the HTK mel scale
(``mel = 2595 * log10(1 + f / 700)``, as ``torchaudio.functional.melscale_fbanks(norm=None,
mel_scale="htk")``), then ``log(mel + 1e-6)``. A convolution exports to ONNX everywhere (a DFT
op does not) and the spectrogram is computed in float32 whatever precision the model runs in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepfake_dist.data.audio import SAMPLE_RATE
from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead, conv_bn_relu

N_FFT, HOP = 400, 160  # 25 ms windows, 10 ms apart
LOG_FLOOR = 1e-6


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int = SAMPLE_RATE, f_min: float = 20.0,
                   f_max: float | None = None) -> Tensor:
    """(n_freqs, n_mels): triangles whose corners are evenly spaced on the HTK mel scale."""
    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    f_max = f_max or sample_rate / 2
    mels = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    corners = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)[:, None]
    rising = (freqs - corners[:-2]) / (corners[1:-1] - corners[:-2])
    falling = (corners[2:] - freqs) / (corners[2:] - corners[1:-1])
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


class LogMel(nn.Module):
    """Waveforms (B, N) at 16 kHz -> log-mel spectrograms (B, 1, n_mels, frames), frames = N // 160 + 1."""

    def __init__(self, n_mels: int = 64):
        super().__init__()
        n_freqs = N_FFT // 2 + 1
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
        k, n = torch.arange(n_freqs, dtype=torch.float64), torch.arange(N_FFT, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(k, n) / N_FFT
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # real then imaginary parts
        self.register_buffer("basis", basis.float()[:, None], persistent=False)  # (2 * n_freqs, 1, N_FFT)
        self.register_buffer("mel", mel_filterbank(n_freqs, n_mels).T.contiguous(), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        if wave.ndim != 2:
            raise ValueError(f"the audio detector takes waveforms (B, samples), got shape {tuple(wave.shape)}")
        with torch.autocast(wave.device.type, enabled=False):
            x = F.pad(wave.float()[:, None], (N_FFT // 2, N_FFT // 2), mode="reflect")
            spectrum = F.conv1d(x, self.basis.float(), stride=HOP)
            real, imaginary = spectrum.chunk(2, dim=1)
            mel = torch.matmul(self.mel.float(), real.square() + imaginary.square())
            return torch.log(mel + LOG_FLOOR)[:, None].to(wave.dtype)


class AudioFeatures(nn.Module):
    """Waveform -> log-mel -> batch-normalised -> conv blocks, each halving frequency and time:
    a map (B, C, n_mels / 8, frames / 8) over the spectrogram."""

    def __init__(self, width: int = 16, n_mels: int = 64):
        super().__init__()
        self.logmel = LogMel(n_mels)
        self.norm = nn.BatchNorm2d(1)
        channels = [1, width, 2 * width, 4 * width, 4 * width]
        self.blocks = nn.Sequential(*(nn.Sequential(conv_bn_relu(c_in, c_out), nn.MaxPool2d(2) if i < 3 else nn.Identity())
                                      for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))))
        self.out_channels = channels[-1]

    def forward(self, wave: Tensor) -> Tensor:
        return self.blocks(self.norm(self.logmel(wave)))


@MODELS.register("audio", kind="detector", clips=True, inputs=("audio",), heads=("audio",))
def audio(in_channels: int = 3, dropout: float = 0.0, width: int = 16, n_mels: int = 64) -> Detector:
    """Scores a clip's sound: its logit is the audio stream's label (fake sound). ``in_channels``
    is the frames' and unused: it trains on clip sets prepared with ``--audio``, reading only
    their sound."""
    features = AudioFeatures(width, n_mels)
    return Detector(features, LogitHead(features.out_channels, dropout), "features.blocks.3")
