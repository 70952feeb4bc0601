"""NPR (Tan et al., CVPR 2024): a detector that looks only at the traces up-sampling leaves.

Generators build images by up-sampling, which ties each pixel to its neighbours in a way real
photos are not. The Neighbouring Pixel Relationships residual ``x - up(down(x))`` (nearest
neighbour, by 2 each way) keeps those traces and drops the content, and a truncated ResNet
(stem, layer1, layer2, pooling, linear: no deep semantic stages to overfit to one generator's
look) classifies it. As in the paper's code, the stem is a 3x3 stride-2 convolution, the residual
is scaled by 2/3, the blocks are ResNet-50's, and the network trains from scratch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead
from deepfake_dist.models.pretrained import Pretrained, load_pretrained

BLOCKS = {"bottleneck": (Bottleneck, [3, 4, 1, 1]), "basic": (BasicBlock, [2, 2, 1, 1])}  # ResNet-50's, ResNet-18's


class NPRResidual(nn.Module):
    """``scale * (x - up(down(x)))``: nearest-neighbour down-sampling keeps the pixel at each even
    row and column, up-sampling repeats it over its 2x2 cell (cut to the input's size when odd)."""

    def __init__(self, scale: float = 2 / 3):
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (x - F.interpolate(x[..., ::2, ::2], size=x.shape[-2:], mode="nearest"))


@MODELS.register("npr", kind="detector")
def npr(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    block: Literal["bottleneck", "basic"] = "bottleneck",
) -> Detector:
    """``block``: "bottleneck" (ResNet-50's, as the paper: 512 channels out of layer2) or "basic"
    (ResNet-18's: 128 channels, about a tenth of the compute). No ImageNet weights fit the NPR
    input: ``pretrained`` may only be a path to a state dict of this same model."""
    if block not in BLOCKS:
        raise UserError(f"npr block '{block}' is unknown; choose one of: {', '.join(BLOCKS)}")
    kind, layers = BLOCKS[block]
    net = ResNet(kind, layers)  # torchvision's, of which the stem and the first two stages are kept
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet inits its convs
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    features = nn.Sequential(OrderedDict([("residual", NPRResidual()), *((n, getattr(net, n)) for n in stages)]))
    model = Detector(features, LogitHead(128 * kind.expansion, dropout), "features.layer2")
    load_pretrained(model, pretrained, "npr")
    return model
