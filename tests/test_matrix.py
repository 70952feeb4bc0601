"""The cross-generator matrix: under two gloo processes each detector trains (and picks its
model) on the real set and one generator's fakes alone, one on all of them, and every detector is
tested on every generator; a rerun skips what is done; bad options are one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import blurry_fake, lfw_faces, toy_fake
from gen_setup import CONFIGS, launch
from PIL import Image

from deepfake_dist.cli import main
from deepfake_dist.config import WandbConfig
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.matrix import plan, summarise
from deepfake_dist.evaluation.matrix_report import csv_text, write_matrix
from deepfake_dist.options import MatrixOptions, PrepareOptions

GENERATORS = {"checker": toy_fake, "blurry": blurry_fake}  # two fake sets that differ in their traces
TINY = ["train.epochs=2", "data.num_workers=0", "data.persistent_workers=false", "checkpoint.every_steps=null",
        "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def matrix_sets(real_face_shards, tmp_path_factory) -> dict:
    """The bundled LFW faces (real) and a fake set per toy generator (24 each, split 12/6/6, 4 per
    shard so that both ranks get test shards), written by the real shard writer."""
    from deepfake_dist.data.prepare import prepare

    root = tmp_path_factory.mktemp("matrix_sets")
    faces, fakes = lfw_faces(), []
    for name, make in GENERATORS.items():
        folder = root / "raw" / name
        folder.mkdir(parents=True)
        for i in range(24):
            Image.fromarray(make(faces[(7 * i) % len(faces)], i)).save(folder / f"{name}_{i:03d}.png")
        out = root / f"lfw-{name}-fake"
        prepare(PrepareOptions(source=f"folder:{folder}", label="fake", out=out, resolution=32, shard_size=4,
                               split=(0.5, 0.25, 0.25)))
        fakes.append(str(out))
    return {"real": str(real_face_shards), "fakes": fakes}


@pytest.fixture(scope="module")
def launched(matrix_sets, tmp_path_factory) -> tuple[Path, list[str]]:
    """``deepfake-dist matrix`` of the smoke CNN under ``accelerate launch`` (2 gloo processes):
    its output folder and its arguments."""
    out = tmp_path_factory.mktemp("matrix") / "cnn"
    args = ["matrix", "--real", matrix_sets["real"], "--fakes", *matrix_sets["fakes"], "--config",
            str(CONFIGS / "smoke.yaml"), "--out", str(out), "--", *TINY]
    result = launch(["-m", "deepfake_dist", *args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, args


@pytest.mark.slow
def test_each_detector_trains_on_one_generator_and_is_tested_on_all(matrix_sets, launched):
    out, _ = launched
    real, fakes = matrix_sets["real"], matrix_sets["fakes"]
    columns = [Path(f).name for f in fakes]
    trained_on = {**{c: [f] for c, f in zip(columns, fakes)}, "all": fakes}
    for row, sets in trained_on.items():
        info = json.loads((out / "runs" / f"{row}-seed0" / "model.json").read_text())
        assert set(info["manifests"]) == {real, *sets}, row  # what it trained and validated on, and nothing else
        assert info["config"]["data"]["train"] == info["config"]["data"]["val"] == [real, *sets]
    summary = json.loads((out / "matrix.json").read_text())
    assert summary["world_size"] == 2 and summary["rows"] == [*columns, "all"] and summary["columns"] == columns
    assert {(s["trained_on"], s["tested_on"]) for s in summary["scores"]} == {(r, c) for r in trained_on for c in columns}
    real_test = split_count(load_manifest(real), "test")
    for score in summary["scores"]:  # each column: the whole real test split and that generator's, no sample twice
        fake = fakes[columns.index(score["tested_on"])]
        assert (score["real"], score["fake"]) == (real_test, split_count(load_manifest(fake), "test"))
        assert 0.0 <= score["auroc"] <= 1.0 and 0.0 <= score["ap"] <= 1.0
    table = (out / "matrix.md").read_text()
    assert "off-diagonal mean" in table and all(f"| {row} |" in table for row in trained_on)
    assert len(csv_text(summary).splitlines()) == 1 + 2 * 3 * len(trained_on)  # AUC and AP: seed 0, mean, std
    assert (out / "matrix.png").stat().st_size > 0 and "data:image/png;base64" in (out / "index.html").read_text()


@pytest.mark.slow
def test_a_rerun_skips_the_matrix_and_a_lost_result_reuses_the_runs(launched, capsys):
    out, args = launched
    assert main(args) == 0
    assert "[0] matrix: up to date, skipped" in capsys.readouterr().err
    before = json.loads((out / "matrix.json").read_text())
    (out / "matrix.md").unlink()
    assert main(args) == 0  # the matrix again, from the finished runs
    err = capsys.readouterr().err
    assert err.count("train: up to date, skipped") == 3 and (out / "matrix.md").is_file()
    again = json.loads((out / "matrix.json").read_text())
    assert again["scores"] == before["scores"]  # one process scores as two did


@pytest.mark.slow
def test_the_matrix_goes_to_wandb_offline(launched, tmp_path):
    summary = json.loads((launched[0] / "matrix.json").read_text())
    write_matrix(tmp_path, summary, WandbConfig(mode="offline"))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_the_off_diagonal_mean_leaves_out_the_generator_a_detector_saw():
    rows, columns, seeds = ["a", "b", "all"], ["a", "b"], [0, 1]
    auc = {("a", 0): (1.0, 0.6), ("a", 1): (0.9, 0.4), ("b", 0): (0.7, 1.0), ("b", 1): (0.5, 0.9),
           ("all", 0): (0.95, 0.96), ("all", 1): (0.97, 0.98)}
    scores = {key: {c: {"auroc": v, "ap": v} for c, v in zip(columns, values)} for key, values in auc.items()}
    summary = summarise(scores, rows, columns, seeds)
    off = summary["off_diagonal"]["auroc"]
    assert set(off) == {"a", "b"}  # the detector trained on all saw every generator
    assert off["a"]["mean"] == pytest.approx(0.5) and off["a"]["std"] == pytest.approx(0.1414, abs=1e-4)
    overall = summary["overall"]["auroc"]
    assert overall["diagonal"]["seeds"] == pytest.approx([1.0, 0.9])
    assert overall["off_diagonal"]["seeds"] == pytest.approx([0.65, 0.45])
    assert not summary["aim_met"]  # off-diagonal 0.55 < 0.85


@pytest.mark.parametrize("change, message", [
    ({"fakes": ["one"]}, "two or more fake sets"),
    ({"fakes": ["a", "train.epochs=3"]}, "fake set 'train.epochs=3' looks like an override"),
    ({"model": "cnn"}, "one of the two (both given)"),
    ({"config": None}, "one of the two (neither given)"),
    ({"seeds": [1, 1]}, "seeds must be one or more distinct integers"),
    ({"overrides": ["data.train=[x]"]}, "the matrix sets data.train for each run itself"),
    ({"overrides": ["train.epochs"]}, "override 'train.epochs' must look like key.sub=value"),
    ({"split": "nope"}, "nope"),
])
def test_bad_options_are_one_line(matrix_sets, tmp_path, change, message):
    opts = MatrixOptions(**{**matrix_sets, "config": str(CONFIGS / "smoke.yaml"), "out": str(tmp_path), **change})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(opts, "test")


def test_two_sets_of_one_name_are_refused(matrix_sets, tmp_path):
    twin = tmp_path / "elsewhere" / Path(matrix_sets["fakes"][0]).name
    shutil.copytree(matrix_sets["fakes"][0], twin)
    opts = MatrixOptions(real=matrix_sets["real"], fakes=[*matrix_sets["fakes"], str(twin)], model="cnn")
    with pytest.raises(UserError, match="two sets are named 'lfw-checker-fake'"):
        plan(opts, "test")


def test_sets_given_the_wrong_way_round_are_refused_before_training(matrix_sets, tmp_path):
    swapped = MatrixOptions(real=matrix_sets["fakes"][0], fakes=[matrix_sets["real"], matrix_sets["fakes"][1]],
                            model="cnn", out=str(tmp_path))
    with pytest.raises(UserError, match=f"the 'test' split of {matrix_sets['fakes'][0]} holds no real images"):
        plan(swapped, "test")
