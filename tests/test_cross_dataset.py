"""DeepfakeBench's cross-dataset protocol: the table's numbers (frame AUC, video AUC as the mean of
a video's frames, per-method rows, averages, the published reference beside ours), and the whole
protocol pipeline (``configs/benchmarks/ffpp_c23_xception.yaml``) on tiny replicas of FF++,
Celeb-DF v2, DFDC and DFDCP under two gloo processes, its table filled in every column."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_setup import free_port

from deepfake_dist.cli import main
from deepfake_dist.data.manifest import load_manifest
from deepfake_dist.engine.metrics import binary_metrics
from deepfake_dist.evaluation.cross_dataset import DEEPFAKEBENCH, reference_of, score_set, table_rows
from deepfake_dist.evaluation.predictions import Predictions
from deepfake_dist.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "configs" / "benchmarks"


def _preds(rows: list[tuple[str, int, float]]) -> Predictions:
    """``(video, label, probability)`` per frame; a fake video's method is its name's prefix."""
    scores = torch.tensor([p for _, _, p in rows])
    metas = [{"video": v, "method": v.split("-")[0], **({"generator": v.split("-")[0]} if y else {})} for v, y, _ in rows]
    keys = [f"set/{v}/{i}" for i, (v, _, _) in enumerate(rows)]
    return Predictions(torch.logit(scores), torch.tensor([y for _, y, _ in rows]), keys, metas)


FRAMES = [("real-0", 0, 0.1), ("real-0", 0, 0.9), ("real-1", 0, 0.3), ("real-1", 0, 0.3),
          ("A-0", 1, 0.6), ("A-0", 1, 0.4), ("B-0", 1, 0.2), ("B-0", 1, 0.25)]


def test_a_set_has_frame_and_video_auc_and_a_row_per_method():
    preds = _preds(FRAMES)
    result = score_set(preds)
    assert result["frame_auc"] == pytest.approx(binary_metrics(preds.scores, preds.labels)["auroc"])
    # videos: real-0 0.5, real-1 0.3, A-0 0.5, B-0 0.225 (means; the max would rank real-0 first)
    videos = binary_metrics(torch.tensor([0.5, 0.3, 0.5, 0.225]), torch.tensor([0, 0, 1, 1]))["auroc"]
    assert (result["videos"], result["fake_videos"], result["video_auc"]) == (4, 2, pytest.approx(videos))
    methods = {m["method"]: m for m in result["methods"]}
    assert set(methods) == {"A", "B"}
    assert (methods["A"]["frames"], methods["A"]["fake_frames"], methods["A"]["videos"]) == (6, 2, 3)  # all reals + A
    assert methods["A"]["video_auc"] == pytest.approx(0.75) and methods["B"]["video_auc"] == 0.0
    assert score_set(_preds(FRAMES[:6]))["methods"] == []  # one method: the set's row says it all


def test_the_table_puts_deepfakebench_beside_ours_and_averages_the_sets():
    scored = {"frame_auc": 0.8, "video_auc": 0.9, "methods": []}
    runs = [{"run": "x", "model": "xception", "reference": "xception",
             "sets": {"FaceForensics++ c23": scored, "Celeb-DF-v2": {**scored, "frame_auc": 0.6, "video_auc": None}}},
            {"run": "y", "model": "resnet18", "reference": None,
             "sets": {"FaceForensics++ c23": scored, "Celeb-DF-v2": scored}}]
    rows, methods = table_rows(["FaceForensics++ c23", "Celeb-DF-v2"], runs)
    published = DEEPFAKEBENCH["xception"]
    assert rows[0]["Celeb-DF-v2/deepfakebench"] == published["Celeb-DF-v2"]
    assert rows[0]["average/frame_auc"] == pytest.approx(0.7)
    assert rows[0]["average/deepfakebench"] == pytest.approx((published["FaceForensics++ c23"] + published["Celeb-DF-v2"]) / 2)
    assert rows[0]["average/video_auc"] is None  # a set without videos: no average that pretends otherwise
    assert rows[1]["FaceForensics++ c23/deepfakebench"] is None and methods == []


def test_the_reference_is_the_detectors_own_unless_named():
    assert reference_of({"model": "xception"}, None) == "xception"
    assert reference_of({"model": "timm", "model_args": {"arch": "efficientnet_b4.ra2_in1k"}}, None) == "efficientnet_b4"
    assert reference_of({"model": "timm", "model_args": {"arch": "legacy_xception"}}, None) == "xception"
    assert reference_of({"model": "resnet18"}, None) is None
    assert reference_of({"model": "resnet18"}, "xception") == "xception"


def test_bad_options_are_one_line(capsys, tmp_path):
    assert main(["cross-dataset", "--checkpoint", "r", "--data", "d", "--reference", "resnet"]) == 2
    assert "--reference resnet: DeepfakeBench's table has xception, efficientnet_b4" in capsys.readouterr().err
    assert main(["cross-dataset", "--checkpoint", "r", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_two_benchmark_configs_are_one_protocol():
    """The same stages and settings but for the detector, and the same prepare stages (so the
    second pipeline takes the first's prepared sets)."""
    x, b4 = (load_pipeline(BENCHMARKS / f"ffpp_c23_{d}.yaml") for d in ("xception", "efficientnet_b4"))
    assert [k for k, _, _ in x["stages"]] == [k for k, _, _ in b4["stages"]] == [
        "prepare", "prepare", "prepare", "prepare", "train", "evaluate", "cross-dataset", "compare"]
    for (kind, a, _), (_, b, _) in zip(x["stages"], b4["stages"]):
        if kind == "prepare":
            assert a == b
        elif kind == "train":
            assert {k: v for k, v in a["set"].items() if k not in ("name", "model")} == \
                {k: v for k, v in b["set"].items() if k not in ("name", "model")}
            assert (a["set"]["model"]["name"], b["set"]["model"]["name"]) == ("xception", "efficientnet_b4")
    refs = [spec["reference"] for p in (x, b4) for kind, spec, _ in p["stages"] if kind == "cross-dataset"]
    assert refs == ["xception", "efficientnet_b4"]
    splits = [spec.get("splits") for kind, spec, _ in x["stages"] if kind == "prepare"]
    assert splits == [None, "test", "test", "test"]  # FF++ whole, the others only what is tested


TINY = ["vars.resolution=32", "vars.frames=2", "vars.epochs=1", "vars.batch_size=4", "vars.shard_size=2",
        "vars.prepare_workers=1", "vars.loader_workers=0", "vars.robustness=false", "vars.explain=false",
        "vars.wandb=disabled", "vars.model={name: timm, arch: test_efficientnet, pretrained: false}"]


@pytest.mark.slow
def test_the_protocol_runs_on_the_replicas_and_fills_the_table(tmp_path):
    pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
    import benchmark_replicas as replicas

    data = tmp_path / "datasets"
    replicas.build_ffpp(data / "FaceForensics++", frames=4)
    replicas.build_celebdf(data / "Celeb-DF-v2", frames=4)
    replicas.build_dfdc(data / "DFDC", frames=4)
    replicas.build_dfdcp(data / "DFDCP", frames=4)
    runs = tmp_path / "runs"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_gloo.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "launch/train.py"), "--config", str(BENCHMARKS / "ffpp_c23_xception.yaml"),
           f"vars.data_root={data}", f"vars.shards={tmp_path / 'shards'}", f"vars.runs={runs}", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "240"}
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Cross-dataset ROC-AUC on the test split" in out and "Per method" in out

    results = runs / "ffpp_c23_xception" / "cross-dataset"
    with open(results / "cross_dataset.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert all(value != "" for value in row.values()), row  # every column filled
    for name in ("FaceForensics++ c23", "Celeb-DF-v2", "DFDC", "DFDCP"):
        assert 0 <= float(row[f"{name}/frame_auc"]) <= 1 and 0 <= float(row[f"{name}/video_auc"]) <= 1
        assert float(row[f"{name}/deepfakebench"]) == DEEPFAKEBENCH["xception"][name]
    with open(results / "cross_dataset_methods.csv", newline="") as f:
        methods = {(r["set"], r["method"]) for r in csv.DictReader(f)}
    assert {m for s, m in methods if s == "FaceForensics++ c23"} == set(replicas.CLASSIC)
    summary = json.loads((results / "cross_dataset.json").read_text())
    # 2 frames of each test video: FF++'s test pair (2 real, 8 fake), CDF's listed 3, DFDC's 5 with
    # a face (the short one too), DFDCP's 3; scored on two processes, none twice
    assert {d["name"]: d["samples"] for d in summary["data"]} == {
        "FaceForensics++ c23": 20, "Celeb-DF-v2": 6, "DFDC": 10, "DFDCP": 6}
    assert summary["world_size"] == 2
    for name in ("celebdf", "dfdc", "dfdcp"):  # prepared for testing only
        assert {s for s, c in load_manifest(tmp_path / "shards" / name)["counts"].items() if c["total"]} == {"test"}
    assert (runs / "ffpp_c23_xception" / "evaluation" / "comparison.md").is_file()
