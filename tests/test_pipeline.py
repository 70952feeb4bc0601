"""Pipelines: stages run in order, finished ones are skipped on a rerun, changed ones rebuilt,
outputs the pipeline did not write are never touched; and the quickstart end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from gen_setup import ROOT

from deepfake_dist.data.manifest import load_manifest
from deepfake_dist.errors import UserError
from deepfake_dist.cli import main
from deepfake_dist.config import read_yaml
from deepfake_dist.pipeline import experiment_kind, load_pipeline, run_pipeline


def write(tmp_path, stages, **top) -> str:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "vars": {"root": str(tmp_path)}, "stamps": "${root}/stamps",
                                    **top, "stages": stages}, sort_keys=False))
    return str(path)


def test_finished_stages_are_skipped_and_changed_ones_rebuilt(tmp_path, gan_run, capsys):
    stages = [{"prepare": {"source": "builtin:lfw", "out": "${root}/lfw", "resolution": 16, "shard_size": 50}},
              {"generate": {"checkpoint": str(gan_run), "num_images": "${n}", "out": "${root}/fake", "shard_size": 4}}]
    path = write(tmp_path, stages, vars={"root": str(tmp_path), "n": 6})
    assert run_pipeline(load_pipeline(path)) == 0
    real_id, fake = load_manifest(tmp_path / "lfw")["id"], load_manifest(tmp_path / "fake")
    assert sum(fake["counts"][s]["fake"] for s in fake["counts"]) == 6
    stamp = json.loads((tmp_path / "stamps" / "01-generate.json").read_text())
    assert stamp["status"] == "done" and stamp["inputs"] == {str(gan_run): fake["generator"]["weights_sha256"]}
    capsys.readouterr()

    assert main(["run", path]) == 0  # nothing changed: nothing runs
    out = capsys.readouterr().err
    assert out.count("up to date, skipped") == 2

    assert main(["run", path, "vars.n=7"]) == 0  # only the stage that reads n runs again
    out = capsys.readouterr().err
    assert "[0] prepare: up to date, skipped" in out and "[1] generate: running" in out
    assert load_manifest(tmp_path / "lfw")["id"] == real_id
    fake = load_manifest(tmp_path / "fake")
    assert sum(fake["counts"][s]["fake"] for s in fake["counts"]) == 7

    (tmp_path / "fake" / "manifest.json").unlink()  # an output went missing: the stage runs again
    assert run_pipeline(load_pipeline(path, ["vars.n=7"])) == 0
    assert "[1] generate: running" in capsys.readouterr().err
    assert load_manifest(tmp_path / "fake")["id"] == fake["id"]


def test_outputs_the_pipeline_did_not_write_are_left_alone(tmp_path):
    (tmp_path / "lfw").mkdir()
    (tmp_path / "lfw" / "mine.txt").write_text("precious")
    path = write(tmp_path, [{"prepare": {"source": "builtin:lfw", "out": "${root}/lfw"}}])
    with pytest.raises(UserError, match="lfw exists but this pipeline did not write it"):
        run_pipeline(load_pipeline(path))
    assert (tmp_path / "lfw" / "mine.txt").read_text() == "precious"


def test_a_set_prepared_by_the_same_stage_of_another_pipeline_is_taken_as_done(tmp_path, capsys):
    """As the two DeepfakeBench configs share their prepared datasets; a set made with other
    settings is still refused."""
    stage = {"prepare": {"source": "builtin:lfw", "out": "${root}/lfw", "resolution": 16, "splits": ["val", "test"]}}
    first = load_pipeline(write(tmp_path, [stage], stamps="${root}/stamps-a"))
    assert run_pipeline(first) == 0
    made = load_manifest(tmp_path / "lfw")
    same = {"prepare": {**stage["prepare"], "splits": "test, val"}}  # the same splits, spelled otherwise
    capsys.readouterr()
    assert run_pipeline(load_pipeline(write(tmp_path, [same], stamps="${root}/stamps-b"))) == 0
    assert "[0] prepare: made by the same stage of another pipeline, taken as done" in capsys.readouterr().err
    assert load_manifest(tmp_path / "lfw")["id"] == made["id"]
    assert json.loads((tmp_path / "stamps-b" / "00-prepare.json").read_text())["status"] == "done"
    other = {"prepare": {**stage["prepare"], "resolution": 24}}
    with pytest.raises(UserError, match="lfw exists but this pipeline did not write it"):
        run_pipeline(load_pipeline(write(tmp_path, [other], stamps="${root}/stamps-c")))
    assert run_pipeline(first) == 0
    assert "[0] prepare: up to date, skipped" in capsys.readouterr().err


@pytest.mark.parametrize("stages, message", [
    ([{"prepair": {}}], r"stages\[0\]: unknown stage 'prepair' \(did you mean 'prepare'\?\)"),
    ([{"prepare": {"source": "builtin:lfw", "out": "${rot}/x"}}], r"unknown variable \$\{rot\} \(did you mean 'root'\?\)"),
    ([{"prepare": {"source": "builtin:lfw", "out": "x", "resolutin": 32}}], "unknown key 'resolutin'"),
    ([{"generate": {"checkpoint": "x"}}], "missing key 'num_images'"),
    ([{"train": {}, "prepare": {}}], "each stage is one 'kind: {settings}' mapping"),
])
def test_bad_pipelines_are_one_clear_line(tmp_path, stages, message):
    with pytest.raises(UserError, match=message):
        run_pipeline(load_pipeline(write(tmp_path, stages)))


def test_a_yaml_file_is_a_training_config_a_pipeline_or_neither(tmp_path, capsys):
    """Decided once, from the parsed file's top-level keys: ``train --config`` runs either kind,
    ``run`` only pipelines, and a file that is neither (or not YAML) is one line, not a guess."""
    pipeline, config = write(tmp_path, [{"compare": {}}]), ROOT / "configs" / "smoke.yaml"
    assert experiment_kind(read_yaml(pipeline), pipeline) == "pipeline"
    assert experiment_kind(read_yaml(config), config) == "config"
    (tmp_path / "neither.yaml").write_text("stagse: []\n")
    (tmp_path / "broken.yaml").write_text("stages: [\n")
    neither, broken = str(tmp_path / "neither.yaml"), str(tmp_path / "broken.yaml")
    for argv, message in (
        (["train", "--config", neither], "neither a training config nor a pipeline: unknown key 'stagse' "
                                         "(did you mean 'stages'?)"),
        (["run", neither], "neither a training config nor a pipeline"),
        (["run", str(config)], "a training config, not a pipeline (it has no 'stages:' list); train it with "
                               f"deepfake-dist train --config {config}"),
        (["train", "--config", pipeline, "--epochs", "2"], f"--epochs applies to one training config; {pipeline}"),
        (["train", "--config", broken], "not valid YAML"),
        (["run", broken], "not valid YAML"),
    ):
        assert main(argv) == 2, argv
        assert message in " ".join(capsys.readouterr().err.split()), argv


def test_quickstart_is_a_pipeline_of_every_stage_kind():
    pipeline = load_pipeline(ROOT / "configs" / "quickstart.yaml")
    kinds = [kind for kind, _, _ in pipeline["stages"]]
    assert kinds == ["prepare", "train", "train", "generate", "generate", "train", "train", "train", "evaluate", "compare"]
    assert str(pipeline["stamps"]) == "runs/quickstart/stages"


@pytest.mark.parametrize("config", ["smoke", "cnn", "resnet18", "densenet121", "hybrid", "vit", "distill"])
def test_detector_configs_train_on_the_shard_sets_the_quickstart_writes(config):
    """So the README's launch commands work right after its first command."""
    written = {spec["out"] for kind, spec, _ in load_pipeline(ROOT / "configs" / "quickstart.yaml")["stages"]
               if kind in ("prepare", "generate")}
    data = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["data"]
    assert data["train"] and set(data["train"]) <= written, (data["train"], written)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_skips_finished_stages_on_rerun(tmp_path):
    tiny = [f"vars.shards={tmp_path / 'shards'}", f"vars.runs={tmp_path / 'runs'}", "vars.gan_steps=4",
            "vars.vae_steps=4", "vars.sample_every=2", "vars.fakes=20", "vars.detector_epochs=1", "vars.width=8",
            "vars.robustness=false", "vars.explain=false", "vars.wandb=disabled"]
    cmd = [sys.executable, "-m", "deepfake_dist", "train", "--config", "configs/quickstart.yaml", *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    first = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout + first.stderr
    for run in ("hybrid", "resnet18", "densenet121"):
        assert run in out and (tmp_path / "runs" / run / "model.safetensors").is_file()
    assert "ROC-AUC" in out and "test split, 28 images" in out  # 20 real + 2 x 4 fake test images
    assert (tmp_path / "runs" / "dcgan" / "samples" / "step-000004.png").is_file()
    assert (tmp_path / "runs" / "evaluation" / "comparison.md").is_file()
    for fake in ("lfw-dcgan-fake", "lfw-vae-fake"):
        assert load_manifest(tmp_path / "shards" / fake)["channels"] == 1  # grey stays grey

    again = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert out.count("up to date, skipped") == 9 and "ROC-AUC" in out
