"""A small base CNN: the baseline every heavier detector must beat, fast enough for CPU runs."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead, conv_bn_relu
from deepfake_dist.models.pretrained import Pretrained, load_pretrained


@MODELS.register("cnn", kind="detector")
def cnn(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    width: int = 32,
    depth: int = 4,
) -> Detector:
    """``depth`` conv-bn-relu-maxpool blocks, channels ``width`` doubling per block; inputs must
    be at least 2**depth pixels (32 with the default depth)."""
    blocks, channels = OrderedDict(), in_channels
    for i in range(depth):
        out = width * 2**i
        blocks[f"block{i + 1}"] = nn.Sequential(conv_bn_relu(channels, out), nn.MaxPool2d(2))
        channels = out
    model = Detector(nn.Sequential(blocks), LogitHead(channels, dropout), f"features.block{depth}")
    load_pretrained(model, pretrained, "cnn")
    return model
