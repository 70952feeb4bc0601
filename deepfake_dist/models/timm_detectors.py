"""Any timm architecture as a detector (``model.name: timm``, ``model.arch: NAME``), and the
field's baselines by name: ``xception`` (timm's ``legacy_xception``, the Xception of
FaceForensics++ and DeepfakeBench) and ``efficientnet_b4``.

timm builds the network without its pooling and classifier, and ``TimmFeatures`` hands its last
feature map to the one-logit head as (B, C, h, w) whatever the family's layout (channels-last
maps, vision-transformer tokens laid back on their patch grid). That map is what Grad-CAM
explains (``gradcam_layer = "features"``), and distillation, export and serving work as for every
detector. Grey inputs get a one-channel stem (timm's ``in_chans``) whose pretrained kernels are
the sum of the RGB ones, as timm adapts them.

Weights come from local files only: ``pretrained: true`` takes the architecture's published file
from ``<torch hub dir>/checkpoints/`` (and says where to fetch it when it is missing); a path may
hold timm's format (the published file kept anywhere) or a whole detector of this architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead
from deepfake_dist.models.pretrained import HubFile, Pretrained, load_pretrained
from deepfake_dist.registry import closest


class TimmFeatures(nn.Module):
    """A timm network without pooling and classifier, its output as a (B, C, h, w) map."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.channels_last = getattr(net, "output_fmt", "NCHW") == "NHWC"
        self.prefix_tokens = getattr(net, "num_prefix_tokens", 0)  # class and register tokens of a ViT
        embed = getattr(net, "patch_embed", None)
        self.patch_size = tuple(embed.patch_size) if embed is not None else None
        self.padded = bool(getattr(embed, "dynamic_img_pad", False))  # a partial patch at the edge counts

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if out.ndim == 3:  # (B, tokens, dim): the patch tokens on their grid
            if self.patch_size is None:
                raise ValueError(f"timm's {type(self.net).__name__} gives tokens on no patch grid: no map to classify")
            h, w = (-(-n // p) if self.padded else n // p for n, p in zip(x.shape[-2:], self.patch_size))
            return out[:, self.prefix_tokens :].transpose(1, 2).unflatten(2, (h, w))
        return out.permute(0, 3, 1, 2) if self.channels_last else out


def check_arch(arch: str) -> None:
    """A UserError with the closest name when timm has no architecture ``arch`` (tag aside)."""
    if not timm.is_model(arch.split(".")[0]):
        raise UserError(f"timm has no architecture '{arch}'{closest(arch, timm.list_models())}; "
                        f"list them with: python -c 'import timm; print(timm.list_models())'")


def build_timm(arch: str, in_channels: int, timm_args: dict[str, Any] | None) -> nn.Module:
    """timm's ``arch`` with ``in_channels`` inputs, no pooling and no classifier, randomly initialised."""
    check_arch(arch)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", in_chans=in_channels,
                                 **(timm_args or {}))
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"timm cannot build '{arch}' with {timm_args or {}} ({reason})") from None
    except TypeError as err:
        raise UserError(f"timm_args {timm_args} do not fit timm's '{arch}' ({err})") from None


def map_channels(net: nn.Module) -> int:
    """Channels of the map a timm network gives without pooling and classifier: its features',
    or those of the layers its head runs before pooling (MambaOut's MLP)."""
    return getattr(net, "head_hidden_size", None) or net.num_features


def published_file(arch: str) -> HubFile | None:
    """Where timm publishes ``arch``'s pretrained weights (Hugging Face before a plain URL:
    safetensors hold no pickle), and the name the file has in the hub cache; None if nowhere."""
    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    tagged = ".".join(filter(None, (cfg.architecture, cfg.tag)))
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        return HubFile(f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}", tagged + Path(filename).suffix)
    if cfg.url:
        return HubFile(cfg.url, cfg.url.rsplit("/", 1)[-1])
    return None


def timm_detector(arch: str, in_channels: int, pretrained: Pretrained, dropout: float,
                  timm_args: dict[str, Any] | None, name: str) -> Detector:
    net = build_timm(arch, in_channels, timm_args)
    model = Detector(TimmFeatures(net), LogitHead(map_channels(net), dropout), "features")
    load_pretrained(model, pretrained, name, imagenet=[(net, published_file(arch), "")])
    return model


@MODELS.register("timm", kind="detector")
def timm_model(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    arch: str = "efficientnet_b0",
    timm_args: dict[str, Any] | None = None,
) -> Detector:
    """``arch``: any timm architecture, optionally with its weights' tag (``convnext_tiny``,
    ``efficientnet_b4.ra2_in1k``); ``timm_args``: more keyword arguments for
    ``timm.create_model`` (e.g. ``drop_path_rate``, or ``img_size`` for a vision transformer)."""
    return timm_detector(arch, in_channels, pretrained, dropout, timm_args, "timm")


@MODELS.register("xception", kind="detector")
def xception(in_channels: int = 3, pretrained: Pretrained = False, dropout: float = 0.0,
             timm_args: dict[str, Any] | None = None) -> Detector:
    """Xception as FaceForensics++ and DeepfakeBench train it: timm's ``legacy_xception`` (a path
    may be Cadene's ``xception-b5690688.pth``, the file DeepfakeBench starts from)."""
    return timm_detector("legacy_xception", in_channels, pretrained, dropout, timm_args, "xception")


@MODELS.register("efficientnet_b4", kind="detector")
def efficientnet_b4(in_channels: int = 3, pretrained: Pretrained = False, dropout: float = 0.0,
                    timm_args: dict[str, Any] | None = None) -> Detector:
    """EfficientNet-B4, DeepfakeBench's other baseline, from timm."""
    return timm_detector("efficientnet_b4", in_channels, pretrained, dropout, timm_args, "efficientnet_b4")
