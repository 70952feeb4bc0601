"""Models: the detector contract, generators, autoencoders and offline, pickle-free weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import resnet18 as torchvision_resnet18

from deepfake_dist.errors import UserError
from deepfake_dist.models import MODELS, create_model, model_kind
from deepfake_dist.models.autoencoder import vae_loss

# name -> constructor arguments (timm models small enough for every size here)
IMAGE_DETECTORS = {
    "cnn": {}, "resnet18": {}, "densenet121": {}, "hybrid": {}, "vit": {}, "npr": {},
    "timm": {"arch": "test_efficientnet"}, "probe": {"backbone": "test_convnext", "pretrained": False},
}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_registry_lists_every_model_with_its_kind():
    shipped = {
        "cnn": "detector",
        "resnet18": "detector",
        "densenet121": "detector",
        "hybrid": "detector",
        "vit": "detector",
        "temporal": "detector",
        "npr": "detector",
        "timm": "detector",
        "xception": "detector",
        "efficientnet_b4": "detector",
        "probe": "detector",
        "dcgan": "gan",
        "cdcgan": "gan",
        "stylegan2": "gan",
        "ae": "autoencoder",
        "vae": "autoencoder",
        "ddpm": "diffusion",
    }
    # the fault tests add a probe model of their own, so the registry may hold more than the shipped ones
    assert set(shipped) <= set(MODELS.names())
    assert {name: model_kind(name) for name in shipped} == shipped


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        create_model("resnet19")
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        create_model("RESNET18")  # the case of a name is no part of the hint
    with pytest.raises(UserError, match="did you mean 'attention'"):
        create_model("hybrid", fusion="atention")
    with pytest.raises(UserError, match="did you mean 'lstm'"):
        create_model("temporal", backbone="cnn", head="lstn")


def test_bad_arguments_name_the_value_and_the_choices():
    with pytest.raises(UserError, match="resolution 48 is not supported; choose one of 32, 64, 128"):
        create_model("vae", resolution=48)
    with pytest.raises(UserError, match="num_classes must be at least 2"):
        create_model("cdcgan", num_classes=1)
    with pytest.raises(UserError, match="must be an image detector, not 'dcgan'"):
        create_model("temporal", backbone="dcgan")


@pytest.mark.parametrize("name", IMAGE_DETECTORS)
@pytest.mark.parametrize("size,in_channels", [(64, 3), (64, 1), (128, 3), (128, 1)])
def test_detector_contract(name, size, in_channels):
    model = create_model(name, in_channels=in_channels, **IMAGE_DETECTORS[name]).eval()
    x = torch.randn(2, in_channels, size, size)
    seen = {}
    layer = model.get_submodule(model.gradcam_layer)
    handle = layer.register_forward_hook(lambda m, i, out: seen.setdefault("map", out))
    with torch.no_grad():
        logits = model(x)
        fmap = model.features(x)
        again = model.classifier(fmap)
    handle.remove()
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()
    assert fmap.ndim == 4 and fmap.shape[0] == 2
    torch.testing.assert_close(again, logits)
    assert seen["map"].ndim == 4 and seen["map"].shape[0] == 2  # Grad-CAM gets a (B, C, h, w) map


@pytest.mark.parametrize("name", IMAGE_DETECTORS)
def test_detectors_take_small_non_square_inputs_and_train_every_parameter(name):
    model = create_model(name, dropout=0.2, **IMAGE_DETECTORS[name])
    logits = model(torch.randn(2, 3, 32, 48))
    assert logits.shape == (2,)
    logits.sum().backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []  # DDP fails on trainable parameters that never get a gradient (a probe's backbone is frozen)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_hybrid_trains_both_branches(fusion):
    model = create_model("hybrid", fusion=fusion)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert grad_norm(model.features.resnet) > 0
    assert grad_norm(model.features.densenet) > 0
    assert grad_norm(model.features.fusion) > 0


@pytest.mark.parametrize("head", ["lstm", "transformer"])
def test_temporal_depends_on_frame_order(head):
    model = create_model(
        "temporal", backbone="cnn", head=head, hidden=32, in_channels=1, backbone_args={"width": 8}
    ).eval()
    clip = torch.randn(2, 5, 1, 64, 64)
    with torch.no_grad():
        logits = model(clip)
        torch.testing.assert_close(model(clip), logits)  # deterministic in eval mode
        shuffled = model(clip[:, [3, 0, 4, 1, 2]])
    assert logits.shape == (2,)
    assert not torch.allclose(shuffled, logits, atol=1e-6)
    model.train()
    model(clip).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_temporal_with_resnet_backbone_points_gradcam_into_the_frames():
    model = create_model("temporal", head="transformer", hidden=32).eval()
    assert model.gradcam_layer == "features.frames.layer4"
    seen = {}
    model.get_submodule(model.gradcam_layer).register_forward_hook(lambda m, i, out: seen.setdefault("map", out))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 3, 64, 64)).shape == (2,)
    assert seen["map"].shape[:2] == (6, 512)  # one map per frame
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", ["dcgan", "cdcgan"])
@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_gan_shapes_and_range(name, resolution, spectral_norm):
    gan = create_model(name, resolution=resolution, channels=3, ngf=8, ndf=8, spectral_norm=spectral_norm)
    assert (gan.resolution, gan.channels, gan.z_dim) == (resolution, 3, 100)
    labels = torch.tensor([0, 1]) if gan.num_classes else None
    z = gan.generator.sample_noise(2)
    images = gan.generator(z, labels)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert gan.discriminator(images, labels).shape == (2,)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in gan.discriminator.modules())
    assert has_bn is not spectral_norm


def test_dcgan_reference_architecture_at_64():
    gan = create_model("dcgan")
    convs = [m for m in gan.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    convs = [m for m in gan.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002  # DCGAN init N(0, 0.02)
    assert gan.num_classes == 0


def test_cdcgan_image_depends_on_label():
    gan = create_model("cdcgan", resolution=32, ngf=8, ndf=8, num_classes=3).eval()
    z = gan.generator.sample_noise(1, generator=torch.Generator().manual_seed(1)).repeat(3, 1)
    with torch.no_grad():
        images = gan.generator(z, torch.tensor([0, 1, 2]))
        scores = gan.discriminator(images[:1].repeat(3, 1, 1, 1), torch.tensor([0, 1, 2]))
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])
    assert len(set(scores.tolist())) == 3  # D sees the label too
    with pytest.raises(ValueError, match="needs labels"):
        gan.generator(z)


def test_seeded_noise_is_reproducible():
    gan = create_model("dcgan", resolution=32, ngf=8, ndf=8)
    a = gan.generator.sample_noise(4, generator=torch.Generator().manual_seed(7))
    b = gan.generator.sample_noise(4, generator=torch.Generator().manual_seed(7))
    assert a.shape == (4, 100)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["ae", "vae"])
@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_autoencoder_shapes_and_range(name, resolution):
    model = create_model(name, resolution=resolution, channels=1, latent_dim=16, width=8)
    out = model(torch.rand(2, 1, resolution, resolution) * 2 - 1)
    assert out["recon"].shape == (2, 1, resolution, resolution)
    assert out["recon"].min() >= -1 and out["recon"].max() <= 1
    assert out["mu"].shape == (2, 16)
    assert (out["logvar"] is None) == (name == "ae")
    if name == "vae":
        assert out["logvar"].shape == (2, 16)
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, resolution, resolution) and model.latent_dim == 16


def test_ae_tracks_latent_moments_in_train_mode_only():
    model = create_model("ae", resolution=32, latent_dim=8, width=8)
    x = torch.rand(4, 3, 32, 32) + 3  # far from the initial N(0, 1)
    model.eval()
    model(x)
    assert torch.equal(model.latent_mean, torch.zeros(8))
    model.train()
    mu = model(x)["mu"].detach()
    torch.testing.assert_close(model.latent_mean, 0.1 * mu.mean(0))
    torch.testing.assert_close(model.latent_std, 0.9 + 0.1 * mu.std(0))


def test_vae_loss_decreases_and_reports_its_parts():
    model = create_model("vae", resolution=32, latent_dim=8, width=8)
    x = F.interpolate(torch.rand(4, 3, 4, 4) * 1.6 - 0.8, size=32, mode="bilinear")  # smooth faces' stand-in
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        parts = vae_loss(model(x), x, kl_weight=1e-3)
        assert set(parts) == {"loss", "recon", "kl"} and parts["kl"] >= 0
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < 0.6 * losses[0]
    out = create_model("ae", resolution=32, latent_dim=8, width=8)(x)
    assert vae_loss(out, x, kl_weight=1.0, recon="l1")["kl"] == 0
    with pytest.raises(UserError, match="choose one of: mse, l1"):
        vae_loss(out, x, recon="l2")


def test_pretrained_true_without_cached_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(UserError) as err:
        create_model("resnet18", pretrained=True)
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(folder) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    with pytest.raises(UserError, match="densenet121-a639ec97.pth"):
        create_model("densenet121", pretrained=True)
    with pytest.raises(UserError, match="no ImageNet weights"):
        create_model("cnn", pretrained=True)
    assert not folder.exists()  # nothing was downloaded


def test_pretrained_true_loads_the_hub_cache_file_and_sums_rgb_for_grey(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    imagenet = torchvision_resnet18(weights=None).state_dict()  # same format as the real file
    torch.save(imagenet, folder / "resnet18-f37072fd.pth")
    rgb = create_model("resnet18", pretrained=True)
    torch.testing.assert_close(rgb.features.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    grey = create_model("resnet18", pretrained=True, in_channels=1)
    torch.testing.assert_close(grey.features.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True))
    from_path = create_model("resnet18", pretrained=str(folder / "resnet18-f37072fd.pth"))
    torch.testing.assert_close(from_path.features.conv1.weight, imagenet["conv1.weight"])


def test_pretrained_path_round_trips_safetensors(tmp_path):
    source = create_model("cnn", width=8)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "cnn.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_model("cnn", width=8, pretrained=str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(UserError, match="cnn.safetensors does not fit this model: 'features.block1"):
        create_model("cnn", width=16, pretrained=str(path))
    with pytest.raises(UserError, match="weights file not found: .*missing.pth"):
        create_model("cnn", pretrained=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file .*junk.pth"):
        create_model("cnn", pretrained=str(tmp_path / "junk.pth"))


class Payload:
    """Unpickling this creates a marker file: stands in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(create_model("cnn", width=8).state_dict(), extra=Payload(marker))
    torch.save(state, path)
    with pytest.raises(UserError, match="refusing to load .*evil.pth"):
        create_model("cnn", width=8, pretrained=str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling would run it
    assert marker.exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_ddpm_samplers_are_deterministic_and_stay_in_the_image_range(sampler):
    pytest.importorskip("diffusers", reason="model ddpm needs diffusers (pip install 'deepfake_dist[diffusion]')")
    model = create_model("ddpm", resolution=16, channels=1, width=8, channel_mult=[1, 2], layers_per_block=1,
                         attention_resolutions=[]).eval()
    noise = torch.randn(2, 1, 16, 16)
    images = model.sample(noise, 3, sampler)
    assert images.shape == noise.shape and torch.isfinite(images).all() and images.abs().max() <= 1
    assert torch.equal(images, model.sample(noise, 3, sampler))
