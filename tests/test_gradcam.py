"""Grad-CAM works for every detector: maps at the input's size, in [0, 1], different for
different inputs; the layer can be overridden; overlays blend the map onto the image."""

import numpy as np
import pytest
import torch

from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.gradcam import find_layer, gradcam, overlay
from deepfake_dist.models import create_model

# (model, constructor args, input shape); ResNet-18 and DenseNet-121 explain a stride-32 map,
# so they get 64-px inputs (a 2x2 map) where 32 px would give one cell
CASES = [
    ("cnn", {"width": 8}, (2, 1, 32, 32)),
    ("resnet18", {}, (2, 3, 64, 64)),
    ("densenet121", {}, (2, 1, 64, 64)),
    ("hybrid", {"channels": 32}, (2, 3, 64, 64)),
    ("vit", {"image_size": 32, "depth": 1, "dim": 32, "heads": 2}, (2, 3, 32, 32)),
    ("temporal", {"backbone": "cnn", "backbone_args": {"width": 8}}, (2, 3, 1, 32, 32)),
    ("npr", {"block": "basic"}, (2, 1, 32, 32)),
    ("timm", {"arch": "test_vit"}, (2, 3, 64, 64)),  # patch tokens on their 4x4 grid
    ("probe", {"backbone": "test_efficientnet", "pretrained": False}, (2, 1, 64, 64)),  # through a frozen backbone
]


def _inputs(shape, seed):
    """Two different smooth images (blobs at different places), as a batch."""
    g = torch.Generator().manual_seed(seed)
    size = shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    batch = []
    for cy, cx in ((size * 0.25, size * 0.3), (size * 0.7, size * 0.75)):
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
        batch.append(blob * 3 + 0.3 * torch.randn(size, size, generator=g))
    x = torch.stack(batch)  # (2, H, W)
    return x.view(2, *([1] * (len(shape) - 4)), 1, size, size).expand(shape).contiguous()


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[c[0] for c in CASES])
def test_maps_have_input_size_lie_in_unit_range_and_differ(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[-3], **kwargs).eval()
    maps = gradcam(model, _inputs(shape, 0))
    assert maps.shape == (*shape[:-3], *shape[-2:])
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.isfinite(maps).all()
    peaks = maps.flatten(1).amax(1)
    assert (peaks == 1).any(), "no map has any positive evidence"
    assert (maps[0] - maps[1]).abs().max() > 0.05


def test_layer_override_and_bad_layer():
    torch.manual_seed(0)
    model = create_model("cnn", in_channels=1, width=8).eval()
    x = _inputs((2, 1, 32, 32), 1)
    assert find_layer(model)[0] == "features.block4"
    default, early = gradcam(model, x), gradcam(model, x, layer="features.block2")
    assert early.shape == default.shape and (early - default).abs().max() > 0.05
    with pytest.raises(UserError, match="did you mean 'features.block3'"):
        gradcam(model, x, layer="features.blok3")


def test_gradcam_does_not_change_the_model_or_need_grad_mode():
    torch.manual_seed(0)
    model = create_model("cnn", in_channels=1, width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs((2, 1, 32, 32), 2)
    with torch.no_grad():
        maps = gradcam(model, x)
    assert maps.shape == (2, 32, 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("image", [
    np.full((24, 32, 3), 128, np.uint8),  # HWC uint8
    torch.full((3, 24, 32), 0.5),  # CHW float in [0, 1]
    torch.full((1, 24, 32), 128, dtype=torch.uint8),  # grey CHW uint8
], ids=["hwc-uint8", "chw-float", "grey-uint8"])
def test_overlay_blends_the_map_at_image_size(image):
    heat = torch.zeros(12, 16)
    heat[:, 8:] = 1.0  # the right half is hot (resized to the image)
    out = overlay(image, heat)
    assert out.size == (32, 24) and out.mode == "RGB"
    array = np.asarray(out).astype(int)
    left, right = array[:, :10].mean((0, 1)), array[:, -10:].mean((0, 1))
    assert right[0] > left[0] + 40  # jet: hot is red
    assert left[2] > right[2] + 40  # cold is blue
