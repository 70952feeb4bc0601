"""Scores that would corrupt metrics without a word: a NaN among them (torchmetrics then passes
every score through a sigmoid), a validation threshold that rounds onto a score, NaN written
into JSON files that strict readers refuse, and a NaN ``train.monitor`` value that blocked every
later best model."""

from __future__ import annotations

import json

import probe_model  # noqa: F401 - registers the fault_probe model
import pytest
import torch
from inject import SMOKE

from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.cli import main
from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.metrics import binary_metrics, confusion, detection_metrics, val_threshold
from deepfake_dist.train.loop import train


def _strict(text: str):
    """Parse as a strict JSON reader would: NaN and Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -0.1])
def test_a_score_that_is_not_a_probability_is_refused(bad):
    scores, labels = torch.tensor([0.1, 0.2, 0.3, 0.9, bad]), torch.tensor([0, 0, 1, 1, 1])
    for metrics in (binary_metrics, detection_metrics):
        with pytest.raises(UserError, match=r"1 of 5 scores are NaN or outside \[0, 1\] \(at index 4\)"):
            metrics(scores, labels)


def test_validation_scores_of_nan_stop_training_naming_the_samples(overrides, capsys):
    """A NaN input in one training batch puts NaN into BatchNorm's running statistics (the loss
    is NaN, so the step is skipped, but the buffers already took it): every validation score is
    then NaN. The run stops at that validation naming samples, instead of ranking a broken model."""
    code = main(["train", "--config", str(SMOKE), *overrides, "model.name=fault_probe",
                 "model.nan_input_at=[2]", "train.epochs=1", "checkpoint.every_steps=null"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, lines
    assert "the model scored NaN for" in lines[0] and "faces/" in lines[0], lines[0]


def test_a_nan_monitor_value_never_wins_nor_blocks(overrides):
    """Infinite logits at the first validation (scores of 1.0, a loss of NaN): with ``monitor:
    val/loss`` that epoch's model is the best only until a number comes; the second epoch's is
    exported. Its one batch is evaluation forward 2 (1 is the check at start)."""
    cfg = load_config(SMOKE, overrides + ["model.name=fault_probe", "model.inf_eval_at=[2]", "train.monitor=val/loss",
                                          "train.monitor_mode=min", "train.early_stopping=1", "data.batch_size=16"])
    summary = train(cfg)
    model = json.loads((cfg.run_dir / "model.json").read_text())
    assert summary["epochs"] == 2 and summary["best step"] == 12 and model["step"] == 12
    assert summary["best val/loss"] == model["val_metrics"]["loss"] > 0


def test_the_validation_threshold_keeps_the_recall_it_was_chosen_for():
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # 0.99999994 in float32
    scores = torch.tensor([below_one, below_one, 1.0, 1.0])
    labels = torch.tensor([0, 0, 1, 1])
    threshold = val_threshold(scores, labels)
    assert binary_metrics(scores, labels, threshold)["recall"] == 1.0
    assert binary_metrics(scores, labels, threshold)["accuracy"] == 1.0
    assert confusion(scores, labels, threshold) == [[2, 0], [0, 2]]
    # the same verdicts whether compared in float32 (torchmetrics, the server) or as Python floats
    assert [s > threshold for s in scores.tolist()] == [False, False, True, True]
    assert (scores > torch.tensor(threshold, dtype=torch.float32)).tolist() == [False, False, True, True]
    assert json.loads(json.dumps(threshold)) == threshold  # stored exactly in model.json / results.json


def test_metrics_files_are_strict_json(tmp_path):
    path = tmp_path / "model.json"
    write_json_atomic(path, {"val_metrics": {"loss": float("nan"), "auroc": float("inf"), "n": [1, float("-inf")]}})
    assert _strict(path.read_text()) == {"val_metrics": {"loss": None, "auroc": None, "n": [1, None]}}
