"""A linear probe (``model.name: probe``): a frozen pretrained feature extractor and a trained
linear head, the recipe of UnivFD (Ojha et al., CVPR 2023), whose frozen features were never
tuned to one generator's artefacts and so carry over to generators training never saw.

The backbone (``model.backbone``) is any timm architecture, built as for ``model.name: timm``;
timm also carries CLIP's image towers (``vit_large_patch14_clip_224.openai`` is UnivFD's),
whose patch tokens the probe pools. The backbone is frozen: its parameters ask for no gradient
(so the trainer gives them to no optimizer and DDP and DeepSpeed leave them alone), and it stays
in eval mode while the model trains, so its BatchNorm statistics and dropout never change.
Checkpoints and exports hold the whole model, backbone included.
"""

from __future__ import annotations

from typing import Any

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead
from deepfake_dist.models.pretrained import Pretrained, imagenet_file, load_pretrained
from deepfake_dist.models.timm_detectors import (
    TimmFeatures,
    build_timm,
    check_arch,
    map_channels,
    published_file,
)


class FrozenFeatures(TimmFeatures):
    """``TimmFeatures`` that never learn: no gradients, and eval mode whatever the model's mode."""

    def __init__(self, net):
        super().__init__(net.requires_grad_(False))

    def train(self, mode: bool = True) -> FrozenFeatures:
        super().train(mode)
        self.net.eval()
        return self


@MODELS.register("probe", kind="detector")
def probe(
    in_channels: int = 3,
    pretrained: Pretrained = True,
    dropout: float = 0.0,
    backbone: str = "vit_large_patch14_clip_224.openai",
    timm_args: dict[str, Any] | None = None,
) -> Detector:
    """``backbone``: a timm architecture (with its weights' tag); ``pretrained``: true takes its
    published file from the hub cache, a path that file kept anywhere (or a whole probe), false
    a randomly initialised backbone (a random-features baseline, and what tests use)."""
    check_arch(backbone)
    source = published_file(backbone)
    if pretrained is True:  # a frozen backbone is only worth its weights: say where they go, before building it
        if source is None:
            raise UserError(f"timm publishes no weights for '{backbone}': set model.pretrained to the path of "
                            f"the backbone's weights file")
        pretrained = imagenet_file(source, otherwise="or set model.pretrained to the file's path")
    net = build_timm(backbone, in_channels, timm_args)
    model = Detector(FrozenFeatures(net), LogitHead(map_channels(net), dropout), "features")
    load_pretrained(model, pretrained, "probe", imagenet=[(net, source, "")])
    return model
