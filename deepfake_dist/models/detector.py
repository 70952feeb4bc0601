"""The detector contract and the pieces every detector shares.

Every detector is ``classifier(features(x))``: ``features`` maps the input to a feature map
(B, C, h, w) and ``classifier`` maps that map to one logit per sample (fake = positive). Grad-CAM,
distillation and export rely only on this contract, so they work for every detector at once.
"""

from __future__ import annotations

from torch import Tensor, nn


class Detector(nn.Module):
    """``forward(x) = classifier(features(x))`` -> (B,) logits; ``gradcam_layer`` names the
    module (dotted path inside this model) whose output map Grad-CAM should explain."""

    def __init__(self, features: nn.Module, classifier: nn.Module, gradcam_layer: str):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.gradcam_layer = gradcam_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LogitHead(nn.Module):
    """Global average pool, dropout, linear -> (B,): works for any spatial size."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(x).flatten(1))).squeeze(1)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """``conv`` itself, or a fresh copy of its configuration taking ``in_channels`` inputs
    (grey faces: in_channels=1); pretrained RGB kernels are adapted when weights load."""
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )


def feature_channels(trunk: nn.Module) -> int:
    """Channels of the map a conv trunk emits: those of its last conv or batch-norm layer."""
    last = [m for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
    return last.out_channels if isinstance(last, nn.Conv2d) else last.num_features
