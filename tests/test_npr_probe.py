"""The detectors built to generalize: NPR (the up-sampling residual into a truncated ResNet) and
the linear probe on a frozen backbone. Each trains, evaluates, explains, exports to ONNX with
parity, quantizes and serves; the probe's backbone stays exactly its weights file under DDP and
under DeepSpeed ZeRO-2 (bf16)."""

from __future__ import annotations

import base64
import json
import subprocess

import httpx
import pytest
import timm
import torch
import torch.nn.functional as F
from deploy_setup import ROOT, detector_config, live_server, one_thread
from safetensors.torch import load_file, save_file
from scale_setup import ACCELERATE_CONFIGS, ENV, accelerate, free_port, smoke

from deepfake_dist.cli import main
from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.models import create_model
from deepfake_dist.models.npr import NPRResidual

BACKBONE = "test_efficientnet"  # a tiny timm network with BatchNorm, so frozen statistics can be checked


def write_backbone_file(path) -> dict[str, torch.Tensor]:
    """A timm-format weights file for BACKBONE, with its ImageNet head and non-trivial BatchNorm
    statistics, as the published file would have; returns what it holds."""
    torch.manual_seed(1)
    net = timm.create_model(BACKBONE, pretrained=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return state


def grey_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probe's backbone state that the file gives a grey model: its RGB stem summed."""
    return {f"features.net.{k}": v.sum(1, keepdim=True) if k == "conv_stem.weight" else v
            for k, v in state.items() if not k.startswith("classifier.")}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone") / f"{BACKBONE}.safetensors"
    return path, write_backbone_file(path)


def test_npr_residual_is_x_minus_its_nearest_neighbour_upsampling():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) ** 1.5  # odd height
    out = NPRResidual(scale=1.0)(x)
    expected = x.clone()
    for i in range(5):
        for j in range(6):
            expected[..., i, j] -= x[..., 2 * (i // 2), 2 * (j // 2)]
    torch.testing.assert_close(out, expected)
    assert (out[..., ::2, ::2] == 0).all()


def test_npr_sees_only_what_up_sampling_leaves():
    """Content that is constant on each 2x2 cell has no residual: adding it changes no logit."""
    model = create_model("npr", in_channels=1).eval()
    assert model.gradcam_layer == "features.layer2"
    stages = ["residual", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert [n for n, _ in model.features.named_children()] == stages
    x = torch.randn(2, 1, 32, 32)
    blocks = F.interpolate(torch.randn(2, 1, 16, 16) * 5, scale_factor=2, mode="nearest")
    with torch.no_grad():
        torch.testing.assert_close(model(x + blocks), model(x))
        assert not torch.allclose(model(x + torch.randn_like(x)), model(x))
    assert model.classifier.fc.in_features == 512  # ResNet-50's blocks, as the paper
    assert create_model("npr", block="basic").classifier.fc.in_features == 128
    with pytest.raises(UserError, match="choose one of: bottleneck, basic"):
        create_model("npr", block="wide")
    with pytest.raises(UserError, match="no ImageNet weights"):
        create_model("npr", pretrained=True)


def test_probe_backbone_is_frozen_and_stays_in_eval_mode(backbone_file):
    path, state = backbone_file
    model = create_model("probe", in_channels=1, backbone=BACKBONE, pretrained=str(path))
    for key, value in grey_backbone(state).items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.fc.weight", "classifier.fc.bias"]
    model.train()
    assert model.training and model.classifier.training
    assert not any(m.training for m in model.features.net.modules())  # BatchNorm and dropout as in eval
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 1, 64, 64) * 3 + 1).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no running statistic moved
    assert [n for n, p in model.named_parameters() if p.grad is not None] == trainable


def test_probe_says_where_its_weights_go_and_never_downloads(tmp_path, monkeypatch, backbone_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(UserError) as err:
        create_model("probe", backbone=BACKBONE)  # pretrained defaults to the published weights
    message = str(err.value)
    assert f"{BACKBONE}.r160_in1k.safetensors" in message and str(folder) in message
    assert f"https://huggingface.co/timm/{BACKBONE}.r160_in1k/resolve/main/model.safetensors" in message
    assert "set model.pretrained to the file's path" in message and "false" not in message
    assert not folder.exists()
    folder.mkdir(parents=True)
    path, state = backbone_file
    (folder / f"{BACKBONE}.r160_in1k.safetensors").write_bytes(path.read_bytes())
    model = create_model("probe", backbone=BACKBONE)
    torch.testing.assert_close(model.features.net.conv_stem.weight, state["conv_stem.weight"])


def test_shipped_configs(deploy_shards, tmp_path, monkeypatch):
    npr = load_config(ROOT / "configs" / "npr.yaml", [f"data.train=[{deploy_shards[0]}]"])
    augment = npr.data.augment
    assert (augment.crop, augment.jpeg, augment.blur) == (0, 0, 0)  # no resampling that would erase the traces
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    probe = load_config(ROOT / "configs" / "probe.yaml", [f"data.train=[{deploy_shards[0]}]"])
    with pytest.raises(UserError, match="vit_large_patch14_clip_224.openai.safetensors"):
        create_model(probe.model.name, **probe.model.args)


@pytest.fixture(scope="module")
def runs(deploy_shards, backbone_file, tmp_path_factory) -> dict:
    """npr and probe (on the backbone file) trained for two epochs on the deploy shards."""
    from deepfake_dist.train.loop import train

    root = tmp_path_factory.mktemp("generalize_runs")
    models = {"npr": "{name: npr}",
              "probe": f"{{name: probe, backbone: {BACKBONE}, pretrained: {backbone_file[0]}}}"}
    with one_thread():
        for name, model in models.items():
            train(detector_config(deploy_shards[0], root, name, f"model={model}", "train.epochs=2"))
    return {name: root / name for name in models}


def test_trained_probe_kept_its_backbone_and_learned_its_head(runs, backbone_file):
    first, last = (load_file(str(runs["probe"] / "checkpoints" / f"step-{n}" / "model.safetensors")) for n in (7, 14))
    for key, value in grey_backbone(backbone_file[1]).items():
        assert torch.equal(first[key], value) and torch.equal(last[key], value), key
    assert not torch.equal(first["classifier.fc.weight"], last["classifier.fc.weight"])
    exported = load_file(str(runs["probe"] / "model.safetensors"))
    assert exported.keys() == first.keys()  # the export holds the whole model, backbone included


def test_evaluate_and_explain(runs, deploy_shards, tmp_path):
    from deepfake_dist.evaluation import evaluate
    from deepfake_dist.options import EvaluateOptions

    result = evaluate(EvaluateOptions(checkpoints=[str(runs["npr"]), str(runs["probe"])], data=[str(deploy_shards[0])],
                                      out=str(tmp_path / "eval"), robustness=False, explain=False, report=False,
                                      workers=0, batch_size=32))
    assert [r["model"] for r in result["rows"]] == ["npr", "probe"]
    assert all(r["test_images"] == 80 and 0 <= r["auroc"] <= 1 for r in result["rows"])
    images = sorted((deploy_shards[1] / "fake").glob("*.png"))[:2]
    for name, layer in (("npr", "features.layer2"), ("probe", "features")):
        out = tmp_path / f"explain-{name}"
        assert main(["explain", "--checkpoint", str(runs[name]), *map(str, images), "--out", str(out)]) == 0
        assert len(list(out.glob("*-gradcam.png"))) == 2


@pytest.mark.parametrize("name", ["npr", "probe"])
def test_onnx_int8_and_serve(runs, deploy_shards, tmp_path, name):
    run = runs[name]
    assert main(["export", "--checkpoint", str(run), "--onnx", str(tmp_path / "model.onnx")]) == 0
    parity = json.loads((tmp_path / "model.json").read_text())["onnx"]["parity"]
    assert parity["images"] == 64 and parity["max_abs_diff"] <= 1e-4

    with one_thread():
        assert main(["compress", "--checkpoint", str(run), "--quantize", "int8", "--calibration-batches", "2",
                     "--out", str(tmp_path / "int8"), "wandb.mode=disabled"]) == 0
    int8 = json.loads((tmp_path / "int8" / "compress.json").read_text())["rows"][1]
    assert int8["quantized_convolutions"] > 0 and int8["step"].startswith(f"int8 {int8['quantized_convolutions']}/")

    from deepfake_dist.options import ServeOptions
    from deepfake_dist.serve.app import create_app

    image = sorted((deploy_shards[1] / "fake").glob("*.png"))[-1]
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=str(run)))) as url:
        r = httpx.post(f"{url}/v1/detect", params={"explain": "true"}, timeout=60,
                       files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name and 0 <= r.json()["fake_probability"] <= 1
    assert base64.b64decode(r.json()["gradcam_png"]).startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize("config, precision", [("cpu_gloo", "no"), ("deepspeed_zero2", "bf16")])
def test_probe_backbone_stays_frozen_on_two_processes(config, precision, face_shards, backbone_file, tmp_path):
    """Under DDP, and under DeepSpeed ZeRO-2 in bf16, the ranks agree and the backbone (BatchNorm
    statistics included) is still the file's in the export; DDP's optimizer holds the head alone."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    model = f"model={{name: probe, backbone: {BACKBONE}, pretrained: {backbone_file[0]}}}"
    cmd = accelerate("--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", "2",
                     "--mixed_precision", precision, "--main_process_port", str(free_port()),
                     *smoke(face_shards, tmp_path, "probe", model, "train.epochs=1"))
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "probe"
    assert json.loads((run / "summary.json").read_text())["ranks agree"]
    exported = load_file(str(run / "model.safetensors"))
    for key, value in grey_backbone(backbone_file[1]).items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key
    if not config.startswith("deepspeed"):
        optimizer = torch.load(run / "checkpoints" / "step-6" / "optimizer.bin", weights_only=True)
        assert len(optimizer["state"]) == 2  # the head's weight and bias, nothing of the backbone
