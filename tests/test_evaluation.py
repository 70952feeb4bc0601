"""Evaluation metrics agree with scikit-learn, thresholds come from validation only, per-source
counts add up, and two ranks give exactly the numbers of one."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from deepfake_dist.config import DataConfig
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation import evaluate
from deepfake_dist.evaluation import metrics as M
from deepfake_dist.evaluation.compare import COLUMNS, comparison_table
from deepfake_dist.evaluation.robustness import PERTURBATIONS
from deepfake_dist.models.exported import load_exported, load_info
from deepfake_dist.options import EvaluateOptions

ROOT = Path(__file__).resolve().parent.parent


def _random_predictions(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).astype(np.float32)
    return torch.from_numpy(scores), torch.from_numpy(labels)


def _sklearn_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    verdict = (scores > threshold).astype(int)
    return {"accuracy": skm.accuracy_score(labels, verdict), "precision": skm.precision_score(labels, verdict),
            "recall": skm.recall_score(labels, verdict), "f1": skm.f1_score(labels, verdict),
            "auroc": skm.roc_auc_score(labels, scores), "ap": skm.average_precision_score(labels, scores),
            "confusion": skm.confusion_matrix(labels, verdict, labels=[0, 1]).tolist()}


def _assert_matches_sklearn(ours: dict, scores, labels, threshold):
    expected = _sklearn_at(np.asarray(scores, np.float64), np.asarray(labels), threshold)
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "ap"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key
    assert ours["confusion"] == expected["confusion"]


@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_metrics_match_sklearn(threshold):
    scores, labels = _random_predictions()
    _assert_matches_sklearn(M.detection_metrics(scores, labels, threshold), scores.numpy(), labels.numpy(), threshold)


def test_calibration_matches_sklearn():
    scores, labels = _random_predictions(seed=1)
    bins = M.reliability(scores, labels, bins=10)
    true, predicted = calibration_curve(labels.numpy(), scores.numpy().astype(np.float64), n_bins=10)
    used = [b for b in bins if b["count"]]
    assert [b["fraction_fake"] for b in used] == pytest.approx(true.tolist(), abs=1e-6)
    assert [b["confidence"] for b in used] == pytest.approx(predicted.tolist(), abs=1e-6)
    assert sum(b["count"] for b in bins) == len(labels)
    ece = sum(b["count"] / len(labels) * abs(b["fraction_fake"] - b["confidence"]) for b in used)
    assert M.ece(scores, labels, bins=10) == pytest.approx(ece, abs=1e-6)


def test_eer_on_constructed_cases():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # one real scores above one fake: at any threshold between 0.4 and 0.6, FPR = FNR = 1/4
    assert M.eer(torch.tensor([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]), labels) == pytest.approx(0.25)
    assert M.eer(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]), labels) == 0.0
    assert M.eer(torch.tensor([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    three_real = torch.tensor([0, 0, 0, 1, 1])
    # a tie moves the ROC from (FPR, FNR) = (0, 1/2) straight to (1/3, 0): they cross at 1/5
    assert M.eer(torch.tensor([0.1, 0.2, 0.5, 0.5, 0.7]), three_real) == pytest.approx(0.2)
    # FNR falls from 1/2 to 0 at FPR = 1/3: they meet at 1/3
    assert M.eer(torch.tensor([0.1, 0.2, 0.6, 0.5, 0.7]), three_real) == pytest.approx(1 / 3)


def test_val_threshold_gives_the_best_balanced_accuracy():
    scores, labels = _random_predictions(seed=2)
    t = M.val_threshold(scores, labels)
    fpr, tpr, _ = skm.roc_curve(labels.numpy(), scores.numpy())
    verdict = (scores.numpy() > t).astype(int)
    assert skm.balanced_accuracy_score(labels.numpy(), verdict) == pytest.approx(np.max((tpr - fpr + 1) / 2), abs=1e-9)


def test_temperature_recovers_the_true_scale():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, generator=g) * 2
    labels = torch.bernoulli(torch.sigmoid(true_logits), generator=g).long()
    t = M.fit_temperature(true_logits * 3, labels)  # an overconfident model: 3x the true logits
    assert t == pytest.approx(3, rel=0.1)

    def nll(temp):
        return torch.nn.functional.binary_cross_entropy_with_logits(true_logits * 3 / temp, labels.double())

    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))


def _predictions(out: Path, run: str) -> dict[str, tuple]:
    with open(out / f"predictions-{run}.csv") as f:
        return {r["key"]: (int(r["label"]), float(r["logit"]), float(r["score"]), r["source"]) for r in csv.DictReader(f)}


def test_evaluate_matches_sklearn_on_its_predictions(evaluated, detectors, eval_sets):
    out = evaluated["out"]
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in evaluated["rows"]] == ["cnn8", "cnn4"]
    for run, result, row in zip(results["runs"], evaluated["results"], evaluated["rows"]):
        preds = _predictions(out, row["run"])
        labels = np.array([v[0] for v in preds.values()])
        scores = np.array([v[2] for v in preds.values()])
        assert row["test_images"] == len(preds) == 15  # 12 from faces, 3 from gen
        _assert_matches_sklearn(result["metrics"]["0.5"], scores, labels, 0.5)
        assert row["eer"] == pytest.approx(M.eer(torch.tensor(scores), torch.tensor(labels)), abs=1e-9)
        # the threshold comes from the validation split, scored separately here
        model, _ = load_exported(row["checkpoint"])
        cfg = DataConfig(train=eval_sets["data"], resolution=32, channels=1, batch_size=8, num_workers=0)
        with torch.no_grad():
            val = [(model(b.image), b.label) for b in eval_loader(eval_sets["data"], "val", EvalOptions.from_data(cfg, 1))]
        val_scores = torch.sigmoid(torch.cat([v[0] for v in val]))
        val_labels = torch.cat([v[1] for v in val])
        threshold = M.val_threshold(val_scores, val_labels)
        assert row["val_threshold"] == pytest.approx(threshold, abs=1e-6)
        _assert_matches_sklearn(result["metrics"]["val"], scores, labels, threshold)
        assert run["metrics"] == json.loads(json.dumps(result["metrics"]))
        # the temperature is stored with the model
        assert load_info(row["checkpoint"])["temperature"] == pytest.approx(row["temperature"]) and row["temperature"] > 0


def test_per_source_counts_add_up(evaluated):
    for row, result in zip(evaluated["rows"], evaluated["results"]):
        sources = {s["source"]: s for s in result["sources"]}
        assert set(sources) == {"real/folder", "fake/folder", "fake/gen_x"}
        assert sum(s["samples"] for s in sources.values()) == row["test_images"]
        preds = _predictions(evaluated["out"], row["run"])
        for name, s in sources.items():
            in_group = [v for v in preds.values() if v[3] == name]
            assert s["samples"] == len(in_group)
            assert s["mean_score"] == pytest.approx(np.mean([v[2] for v in in_group]), abs=1e-6)
            label = 1 if name.startswith("fake") else 0
            assert s["accuracy@0.5"] == pytest.approx(np.mean([(v[2] > 0.5) == label for v in in_group]), abs=1e-9)


def test_robustness_and_comparison_tables(evaluated):
    out = evaluated["out"]
    for result in evaluated["results"]:
        assert [r["perturbation"] for r in result["robustness"]] == list(PERTURBATIONS)
        aurocs = {r["perturbation"]: r["0.5"]["auroc"] for r in result["robustness"]}
        assert all(0 <= v <= 1 for v in aurocs.values())
        assert aurocs["blur sigma 2"] != result["metrics"]["0.5"]["auroc"]  # the perturbation reached the model
    with open(out / "robustness.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * (1 + len(PERTURBATIONS))
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["cnn8", "cnn4"]
    for parsed, row in zip(table, evaluated["rows"]):
        assert float(parsed["f1"]) == pytest.approx(row["f1"]) and int(parsed["params"]) == row["params"]
        assert float(parsed["images_per_s"]) > 0
    md = (out / "comparison.md").read_text()
    assert "threshold 0.5" in md and "chosen on validation" in md and md.count("\n| cnn") == 2
    rich_table = comparison_table(evaluated["rows"])
    assert [c.header for c in rich_table.columns] == [h for _, h, _ in COLUMNS] and rich_table.row_count == 2


def test_bad_input_is_one_line_user_error(detectors, eval_sets, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate(EvaluateOptions(checkpoints=detectors[:1], data=[str(tmp_path / "missing")], out=tmp_path / "o"))
    with pytest.raises(UserError, match="expected one of"):
        evaluate(EvaluateOptions(checkpoints=detectors[:1], data=eval_sets["data"], split="testing", out=tmp_path / "o"))
    with pytest.raises(UserError, match="not found"):
        evaluate(EvaluateOptions(checkpoints=[str(tmp_path)], data=eval_sets["data"], out=tmp_path / "o"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_numbers(evaluated, detectors, eval_sets, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu_gloo.yaml"), "--main_process_port", str(_free_port()),
           "-m", "deepfake_dist", "evaluate", "--checkpoint", *detectors, "--data", *eval_sets["data"],
           "--out", str(out), "--batch-size", "8", "--workers", "0", "--no-explain", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    one = json.loads((evaluated["out"] / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["runs"], two["runs"]):
        single, double = _predictions(evaluated["out"], a["run"]), _predictions(out, b["run"])
        assert list(single) == list(double)  # same keys, none twice, none lost
        assert all(single[k][0] == double[k][0] and single[k][1] == pytest.approx(double[k][1], abs=1e-5)
                   for k in single)
        for key in ("metrics", "sources", "calibration", "robustness"):
            _assert_close(a[key], b[key], key)
        skip = {"images_per_s", "eval_images_per_s", "world_size"}
        _assert_close({k: v for k, v in a["row"].items() if k not in skip},
                      {k: v for k, v in b["row"].items() if k not in skip}, "row")


def _assert_close(a, b, where: str, tol: float = 1e-6):
    """Equal structure and strings, numbers within ``tol``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=tol), where
    else:
        assert a == b, where
