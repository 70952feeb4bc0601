"""A small Vision Transformer built from torchvision's ``VisionTransformer`` parts.

``features`` returns the encoded patch tokens laid out as a map (B, dim, H/patch, W/patch) and
the classifier mean-pools them (no class-token head), so the detector contract and plain
Grad-CAM work as for the CNNs: ``gradcam_layer = "features"`` (the token map, no reshape
transform needed; with a mean-pooled head every patch token receives gradient). The class token
is kept as an extra attention token (a "register"). Inputs of another size than ``image_size``
get bicubically resized position embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from deepfake_dist.models import MODELS
from deepfake_dist.models.detector import Detector, LogitHead, with_in_channels
from deepfake_dist.models.pretrained import Pretrained, load_pretrained


class ViTFeatures(nn.Module):
    def __init__(self, vit: VisionTransformer, in_channels: int):
        super().__init__()
        self.conv_proj = with_in_channels(vit.conv_proj, in_channels)
        self.class_token = vit.class_token
        self.encoder = vit.encoder  # pos_embedding, dropout, layers, ln; its forward needs a fixed size
        self.grid = vit.image_size // vit.patch_size

    def forward(self, x: Tensor) -> Tensor:
        patches = self.conv_proj(x)  # (B, dim, h, w)
        b, dim, h, w = patches.shape
        pos = self.encoder.pos_embedding
        if (h, w) != (self.grid, self.grid):
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        tokens = torch.cat([self.class_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
        tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens + pos)))
        return tokens[:, 1:].transpose(1, 2).reshape(b, dim, h, w)


@MODELS.register("vit", kind="detector")
def vit(
    in_channels: int = 3,
    pretrained: Pretrained = False,
    dropout: float = 0.0,
    image_size: int = 64,
    patch_size: int = 8,
    depth: int = 6,
    dim: int = 192,
    heads: int = 3,
    mlp_dim: int | None = None,
) -> Detector:
    """``mlp_dim`` defaults to 4 * dim. No ImageNet weights fit these sizes: ``pretrained`` may
    only be a path to a state dict of this same model."""
    net = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=dim,
        mlp_dim=mlp_dim or 4 * dim,
        num_classes=1,
    )
    model = Detector(ViTFeatures(net, in_channels), LogitHead(dim, dropout), "features")
    load_pretrained(model, pretrained, "vit")
    return model
