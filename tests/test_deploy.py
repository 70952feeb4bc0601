"""Pruning, int8 quantization, the compress command and ONNX export on a trained detector."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from deploy_setup import one_thread
from torch import nn

from deepfake_dist.cli import main
from deepfake_dist.deploy.prune import parameter_counts, prunable, prune_model, sparsity
from deepfake_dist.errors import UserError
from deepfake_dist.models import create_model
from deepfake_dist.options import CompressOptions


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_unstructured_pruning_reaches_the_sparsity_and_is_permanent(name):
    model = create_model(name, in_channels=1)
    prune_model(model, 0.3)
    for layer_name, layer in prunable(model, structured=False):
        zeros = float((layer.weight == 0).float().mean())
        assert abs(zeros - 0.3) <= 1 / layer.weight.numel() + 1e-6, layer_name
        assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")  # masks folded in
    assert abs(sparsity(model) - 0.3) < 0.001
    total, nonzero = parameter_counts(model)
    assert nonzero < total
    assert set(model.state_dict()) == set(create_model(name, in_channels=1).state_dict())  # saves like the original


def test_structured_pruning_zeroes_whole_output_channels():
    model = create_model("cnn", in_channels=1, width=8)
    prune_model(model, 0.5, structured=True)
    for _, conv in prunable(model, structured=True):
        dead = (conv.weight.flatten(1).abs().sum(1) == 0).sum().item()
        assert dead == round(0.5 * conv.out_channels)
    assert (model.classifier.fc.weight != 0).all()  # the logit layer is left whole


def test_pruning_refuses_a_bad_fraction():
    with pytest.raises(UserError, match="--prune 1.5"):
        prune_model(create_model("cnn", in_channels=1), 1.5)


@pytest.fixture(scope="module")
def int8_report(deploy_run, tmp_path_factory):
    from deepfake_dist.deploy.compress import compress

    out = tmp_path_factory.mktemp("int8")
    with one_thread():
        return compress(CompressOptions(checkpoint=deploy_run, out=out, quantize="int8", calibration_batches=4)), out


def test_int8_quantizes_the_convolutions_and_keeps_accuracy(int8_report, deploy_run):
    from deepfake_dist.deploy.quantize import load_int8

    report, out = int8_report
    fp32, int8 = report["rows"]
    assert int8["test_images"] == 80
    assert int8["quantized_convolutions"] == 4 and int8["step"] == "int8 4/4 conv"  # every conv of the 4-block cnn
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.02, (fp32["accuracy"], int8["accuracy"])
    assert fp32["accuracy"] >= 0.85  # a model that learned something, so the comparison means something
    assert int8["file_mb"] < 0.5 * fp32["file_mb"]
    # the saved int8 model loads back (weights_only) with real quantized convolution modules
    model = load_int8(out / "model-int8.pt", json.loads((out / "model-int8.json").read_text()))
    quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert len(quantized) == 4
    assert not any(type(m) is nn.Conv2d for m in model.modules())


def test_int8_convolutions_for_resnet18_npr_and_the_untraceable_hybrid():
    """FX traces resnet18 and npr (whose bottlenecks call one ReLU on inputs of different widths)
    whole; the hybrid (min over shapes) falls back to its traceable parts."""
    from deepfake_dist.deploy.quantize import quantize_int8, quantized_convolutions

    for name, convs in (("resnet18", 20), ("npr", 24), ("hybrid", 50)):
        model = create_model(name, in_channels=1).eval()
        x = torch.randn(2, 1, 32, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_int8(model, x, [x])
        assert quantized_convolutions(q) >= convs, name
        assert torch.allclose(q(x), model(x), atol=0.5)


class Gained(nn.Sequential):
    def gain(self) -> float:
        return 2.0


class CallsAMethodOfATracedChild(nn.Module):
    """FX cannot trace its forward (a branch on a value), so its child is traced alone, and the
    traced child has lost the method the forward calls."""

    def __init__(self):
        super().__init__()
        self.body = Gained(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        y = self.body(x) * self.body.gain()
        return self.fc(y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))).squeeze(1)


def test_int8_that_torch_cannot_apply_keeps_the_float_model_and_says_why(tmp_path):
    from deepfake_dist.deploy.compress import int8_step, markdown_table

    x = torch.randn(2, 1, 8, 8)
    row = int8_step(CallsAMethodOfATracedChild().eval(), [x], {}, tmp_path, None, 1)
    assert row["step"] == "int8 not possible: float kept" and "AttributeError" in row["int8_error"]
    assert not (tmp_path / "model-int8.pt").exists()
    assert f"int8 not possible: float kept: {row['int8_error']}" in markdown_table([row])


def test_compress_cli_prunes_fine_tunes_and_writes_the_table(deploy_run, tmp_path, capsys):
    out = tmp_path / "compressed"
    code = main(["compress", "--checkpoint", str(deploy_run), "--prune", "0.5", "--finetune-epochs", "1",
                 "--out", str(out), "wandb.mode=disabled"])
    assert code == 0
    report = json.loads((out / "compress.json").read_text())
    steps = [r["step"] for r in report["rows"]]
    assert steps[0] == "original" and steps[1].startswith("pruned") and steps[2].startswith("fine-tuned")
    original, pruned, tuned = report["rows"]
    for row in (pruned, tuned):
        assert row["nonzero"] <= 0.55 * original["nonzero"]
        assert row["params"] == original["params"]
    for key in ("file_mb", "latency_b1_ms", "latency_b32_ms", "accuracy", "auroc"):
        assert all(r[key] is not None for r in report["rows"]), key
    assert "| original |" in (out / "compress.md").read_text()
    assert "original" in capsys.readouterr().out
    # the fine-tuned model went through the normal trainer and is an ordinary exported model
    from deepfake_dist.models.exported import load_exported

    model, info = load_exported(out)
    assert info["compression"]["finetune_epochs"] == 1
    assert abs(sparsity(model) - 0.5) < 0.01
    assert (out / "finetune" / "summary.json").is_file()


def test_compress_needs_a_step(deploy_run, tmp_path):
    assert main(["compress", "--checkpoint", str(deploy_run), "--out", str(tmp_path)]) == 2


def test_onnx_export_matches_pytorch_on_real_test_images(deploy_run, deploy_shards, tmp_path):
    from deepfake_dist.deploy.onnx_export import load_onnx
    from deepfake_dist.deploy.scorer import model_input
    from deepfake_dist.models.exported import load_exported

    path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(deploy_run), "--onnx", str(path)]) == 0
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["onnx"]["parity"]["max_abs_diff"] <= 1e-4 and info["onnx"]["parity"]["images"] == 64
    assert info["model"] == "cnn" and info["manifests"]  # the same metadata as model.json

    # independently: real images through the shared preprocessing, batch 1 and batch 7
    from PIL import Image

    files = sorted((deploy_shards[1] / "fake").glob("*.png"))[:4] + sorted((deploy_shards[1] / "real").glob("*.png"))[:3]
    model, _ = load_exported(deploy_run)
    inputs = torch.stack([model_input(Image.open(f), info) for f in files])
    session, _ = load_onnx(path)
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert np.abs(session.run(None, {"image": inputs.numpy()})[0] - expected).max() <= 1e-4
    assert np.abs(session.run(None, {"image": inputs[:1].numpy()})[0] - expected[:1]).max() <= 1e-4


def test_onnx_export_refuses_a_wrong_suffix(deploy_run, tmp_path):
    assert main(["export", "--checkpoint", str(deploy_run), "--onnx", str(tmp_path / "model.pt")]) == 2
