"""timm architectures as detectors: any family's last map under the one-logit head, weights from
local files only (timm's format, Cadene's Xception, or a whole detector), and the baselines
``xception`` and ``efficientnet_b4`` through training and ONNX export. A small timm model trains
in bf16, resumes bit-exactly, exports to ONNX, quantizes and serves."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import timm
import torch
from deploy_setup import ROOT, detector_config, live_server, one_thread
from safetensors.torch import load_file, save_file

from deepfake_dist.cli import main
from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.models import create_model


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch, layout", [("test_efficientnet", "NCHW"), ("test_mambaout", "NHWC"),
                                          ("test_vit", "tokens")])
def test_every_layout_becomes_a_map_under_the_one_logit_head(arch, layout):
    model = create_model("timm", arch=arch, in_channels=1).eval()
    net = model.features.net
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        raw, fmap = net(x), model.features(x)
        torch.testing.assert_close(model.classifier(fmap), model(x))
    assert fmap.shape[:2] == (2, net.head_hidden_size) and model.gradcam_layer == "features"
    if layout == "NHWC":
        torch.testing.assert_close(fmap, raw.permute(0, 3, 1, 2))
    elif layout == "tokens":  # patch tokens back on their 4x3 grid of 16-px patches, the class token left out
        assert fmap.shape[2:] == (4, 3)
        torch.testing.assert_close(fmap[:, :, 1, 2], raw[:, net.num_prefix_tokens + 1 * 3 + 2])
    else:
        assert torch.equal(fmap, raw)


def test_unknown_architecture_and_bad_arguments_are_one_line():
    with pytest.raises(UserError, match="timm has no architecture 'convnext_tiyn' \\(did you mean 'convnext_tiny'"):
        create_model("timm", arch="convnext_tiyn")
    with pytest.raises(UserError, match="timm_args {'no_such_option': 1} do not fit timm's 'test_vit'"):
        create_model("timm", arch="test_vit", timm_args={"no_such_option": 1})


def test_pretrained_true_names_the_published_file_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    expected = {
        "xception": ("xception-43020ad28.pth", "https://github.com/rwightman/pytorch-image-models/releases/download/"
                                               "v0.1-cadene/xception-43020ad28.pth"),
        "efficientnet_b4": ("efficientnet_b4.ra2_in1k.safetensors",
                            "https://huggingface.co/timm/efficientnet_b4.ra2_in1k/resolve/main/model.safetensors"),
    }
    for name, (file, url) in expected.items():
        with pytest.raises(UserError) as err:
            create_model(name, pretrained=True)
        message = str(err.value)
        assert f"save it as {folder / file}" in message and url in message, message
        assert "or set pretrained to false" in message
    assert not folder.exists()


def test_published_file_loads_with_a_grey_stem_summed_from_rgb(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    published = timm.create_model("test_efficientnet").state_dict()  # with its 1000-class head, as published
    save_file(published, str(folder / "test_efficientnet.r160_in1k.safetensors"))
    grey = create_model("timm", arch="test_efficientnet", in_channels=1, pretrained=True)
    torch.testing.assert_close(grey.features.net.conv_stem.weight, published["conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(grey.features.net.bn2.running_var, published["bn2.running_var"])
    torch.save(published, tmp_path / "kept_anywhere.pth")
    rgb = create_model("timm", arch="test_efficientnet", pretrained=str(tmp_path / "kept_anywhere.pth"))
    torch.testing.assert_close(rgb.features.net.conv_stem.weight, published["conv_stem.weight"])

    whole = tmp_path / "detector.safetensors"  # a whole detector, as compress's fine-tuning passes it
    save_file(grey.state_dict(), str(whole))
    again = create_model("timm", arch="test_efficientnet", in_channels=1, pretrained=str(whole))
    torch.testing.assert_close(again.classifier.fc.weight, grey.classifier.fc.weight)
    with pytest.raises(UserError, match="does not fit this model or its backbone: .* weights missing"):
        create_model("timm", arch="test_convnext", pretrained=str(whole))


def test_xception_reads_cadenes_file_with_pointwise_kernels_as_matrices(tmp_path):
    """The ImageNet Xception that FaceForensics++ and DeepfakeBench start from stores each 1x1
    pointwise kernel as a (out, in) matrix and names its head fc."""
    source = timm.create_model("legacy_xception").state_dict()
    cadene = {k: v.flatten(1) if "pointwise" in k else v for k, v in source.items()}
    assert cadene["block1.rep.0.pointwise.weight"].ndim == 2 and "fc.weight" in cadene
    torch.save(cadene, tmp_path / "xception-b5690688.pth")
    model = create_model("xception", pretrained=str(tmp_path / "xception-b5690688.pth"))
    assert model.features.net.pretrained_cfg["architecture"] == "legacy_xception"
    for key, value in model.features.net.state_dict().items():
        torch.testing.assert_close(value, source[key], msg=key)


@pytest.mark.parametrize("config", ["xception", "efficientnet_b4", "recipes/blur_jpeg"])
def test_shipped_configs_load(config, deploy_shards):
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"data.train=[{deploy_shards[0]}]"])
    assert cfg.model.args["pretrained"] is True and cfg.data.resolution >= 224
    if config == "recipes/blur_jpeg":  # CNNDetection's Blur+JPEG (0.5) on its ResNet-50
        assert (cfg.data.augment.blur, cfg.data.augment.jpeg, cfg.model.args["arch"]) == (0.5, 0.5, "resnet50")


@pytest.mark.slow
@pytest.mark.parametrize("name, arch", [("xception", "legacy_xception"), ("efficientnet_b4", "efficientnet_b4")])
def test_baselines_train_every_parameter_and_export_to_onnx(name, arch, deploy_shards, tmp_path):
    from deepfake_dist.train.loop import train

    model = create_model(name, in_channels=1)
    assert model.features.net.pretrained_cfg["architecture"] == arch
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP needs every one

    with one_thread():
        train(detector_config(deploy_shards[0], tmp_path, name, f"model={{name: {name}}}",
                              "train.max_steps=1", "train.epochs=1"))
    assert main(["export", "--checkpoint", str(tmp_path / name), "--onnx", str(tmp_path / "model.onnx")]) == 0
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["model"] == name and info["onnx"]["parity"]["max_abs_diff"] <= 1e-4


@pytest.fixture(scope="module")
def timm_run(deploy_shards, tmp_path_factory):
    """A small timm ViT trained two epochs in bf16 (autocast on the CPU), "full"; and "resumed":
    a copy of it left as a run killed after its first checkpoint would be, then run again."""
    from deepfake_dist.train.loop import train

    root = tmp_path_factory.mktemp("timm_runs")
    args = ["model={name: timm, arch: test_vit}", "train.mixed_precision=bf16", "train.epochs=2"]
    with one_thread():
        train(detector_config(deploy_shards[0], root, "full", *args))
        shutil.copytree(root / "full" / "checkpoints" / "step-7", root / "resumed" / "checkpoints" / "step-7")
        train(detector_config(deploy_shards[0], root, "resumed", *args))
    return root


def test_timm_run_resumes_bit_exactly(timm_run):
    full, resumed = (load_file(str(timm_run / name / "checkpoints" / "step-14" / "model.safetensors"))
                     for name in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    summary = json.loads((timm_run / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 14 and summary["epochs"] == 2


def test_timm_run_exports_quantizes_and_serves(timm_run, deploy_shards, tmp_path):
    run = timm_run / "full"
    assert main(["export", "--checkpoint", str(run), "--onnx", str(tmp_path / "model.onnx")]) == 0
    assert json.loads((tmp_path / "model.json").read_text())["onnx"]["parity"]["max_abs_diff"] <= 1e-4
    with one_thread():
        assert main(["compress", "--checkpoint", str(run), "--quantize", "int8", "--calibration-batches", "2",
                     "--out", str(tmp_path / "int8"), "wandb.mode=disabled"]) == 0
    int8 = json.loads((tmp_path / "int8" / "compress.json").read_text())["rows"][1]
    assert int8["step"] == "int8 1/1 conv" and int8["quantized_layers"]["dynamic.Linear"] > 0  # patches, then MLPs

    from deepfake_dist.options import ServeOptions
    from deepfake_dist.serve.app import create_app

    image = sorted((deploy_shards[1] / "real").glob("*.png"))[-1]
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=str(run)))) as url:
        r = httpx.post(f"{url}/v1/detect", params={"explain": "true"}, timeout=60,
                       files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "timm" and "gradcam_png" in r.json()
