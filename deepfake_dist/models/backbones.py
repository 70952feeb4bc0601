"""torchvision ResNet-18 and DenseNet-121 as trunks (whole, or cut at a named stage for the
hybrid) and as detectors with our one-logit head; module names match torchvision's weight files."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models import DenseNet121_Weights, ResNet18_Weights, densenet121, resnet18

from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead, feature_channels, with_in_channels
from deepfake_dist.models.pretrained import ImagenetPart, Pretrained, load_pretrained


def cut(named: list[tuple[str, nn.Module]], until: str) -> nn.Sequential:
    names = [n for n, _ in named]
    return nn.Sequential(OrderedDict(named[: names.index(until) + 1]))


def resnet18_trunk(in_channels: int = 3, until: str = "layer4") -> tuple[nn.Sequential, ImagenetPart]:
    """ResNet-18 from the stem through ``until`` (e.g. "layer2"); keys match resnet18-*.pth."""
    net = resnet18(weights=None)
    net.conv1 = with_in_channels(net.conv1, in_channels)
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = cut([(n, getattr(net, n)) for n in stages], until)
    return trunk, (trunk, ResNet18_Weights.IMAGENET1K_V1, "")


def densenet121_trunk(in_channels: int = 3, until: str = "norm5") -> tuple[nn.Sequential, ImagenetPart]:
    """DenseNet-121 ``features`` through ``until`` (e.g. "transition2"); a ReLU follows norm5
    as in torchvision's forward. Keys match densenet121-*.pth minus its "features." prefix."""
    net = densenet121(weights=None)
    net.features.conv0 = with_in_channels(net.features.conv0, in_channels)
    named = list(net.features.named_children())
    if until == "norm5":
        named.append(("relu5", nn.ReLU()))
        until = "relu5"
    trunk = cut(named, until)
    return trunk, (trunk, DenseNet121_Weights.IMAGENET1K_V1, "features.")


def trunk_detector(
    name: str, trunk: nn.Module, part: ImagenetPart, pretrained: Pretrained, dropout: float, gradcam: str
) -> Detector:
    model = Detector(trunk, LogitHead(feature_channels(trunk), dropout), gradcam)
    load_pretrained(model, pretrained, name, imagenet=[part])
    return model


@MODELS.register("resnet18", kind="detector")
def resnet18_detector(in_channels: int = 3, pretrained: Pretrained = False, dropout: float = 0.0) -> Detector:
    return trunk_detector("resnet18", *resnet18_trunk(in_channels), pretrained, dropout, "features.layer4")


@MODELS.register("densenet121", kind="detector")
def densenet121_detector(in_channels: int = 3, pretrained: Pretrained = False, dropout: float = 0.0) -> Detector:
    return trunk_detector("densenet121", *densenet121_trunk(in_channels), pretrained, dropout, "features.norm5")
