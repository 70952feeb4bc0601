"""ResNet-18 + DenseNet-121 hybrid: two different inductive biases on the same face, fused.

ResNet-18 runs to layer2 (128 ch, stride 8) and DenseNet-121 to transition2 (256 ch, stride 16);
both maps are average-pooled to the smaller grid and fused by a learned layer, so every output
channel can draw on both branches (and both branches learn from the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepfake_dist.models import MODELS
from deepfake_dist.models.backbones import densenet121_trunk, resnet18_trunk
from deepfake_dist.models.detector import Detector, LogitHead, conv_bn_relu, feature_channels
from deepfake_dist.models.pretrained import Pretrained, load_pretrained
from deepfake_dist.registry import Registry

FUSIONS = Registry("fusion")


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Concatenate, then 1x1 conv + BN + ReLU mixes the channels of both branches."""

    def __init__(self, a_channels: int, b_channels: int, out_channels: int):
        super().__init__()
        self.mix = conv_bn_relu(a_channels + b_channels, out_channels, kernel_size=1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.mix(torch.cat([a, b], 1))


@FUSIONS.register("attention")
class AttentionFusion(nn.Module):
    """Selective-kernel style: project both maps to ``out_channels``; from their pooled sum, a
    small MLP gives per-channel softmax weights over the two branches (input-dependent)."""

    def __init__(self, a_channels: int, b_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        self.project_a = conv_bn_relu(a_channels, out_channels, kernel_size=1)
        self.project_b = conv_bn_relu(b_channels, out_channels, kernel_size=1)
        hidden = max(out_channels // reduction, 16)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(out_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * out_channels, 1),
        )

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self.project_a(a), self.project_b(b)
        weights = self.gate(a + b).unflatten(1, (2, -1)).softmax(1)  # (B, 2, C, 1, 1)
        return weights[:, 0] * a + weights[:, 1] * b


class HybridFeatures(nn.Module):
    """Both trunks on the same input, pooled to the smaller grid, then fused."""

    def __init__(self, resnet: nn.Module, densenet: nn.Module, fusion: nn.Module):
        super().__init__()
        self.resnet, self.densenet, self.fusion = resnet, densenet, fusion

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.resnet(x), self.densenet(x)
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
        return self.fusion(F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size))


@MODELS.register("hybrid", kind="detector")
def hybrid(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    fusion: str = "concat",
    channels: int = 256,
) -> Detector:
    """``fusion``: "concat" or "attention"; ``channels``: width of the fused map.
    ``pretrained=True`` loads both ImageNet files; a path loads a whole hybrid state dict."""
    fusion_cls = FUSIONS.get(fusion)
    resnet, resnet_part = resnet18_trunk(in_channels, until="layer2")
    densenet, densenet_part = densenet121_trunk(in_channels, until="transition2")
    fuse = fusion_cls(feature_channels(resnet), feature_channels(densenet), channels)
    model = Detector(HybridFeatures(resnet, densenet, fuse), LogitHead(channels, dropout), "features.fusion")
    load_pretrained(model, pretrained, "hybrid", imagenet=[resnet_part, densenet_part])
    return model
