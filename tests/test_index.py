"""``deepfake-dist shards index``: WebDataset shards written by a stock ``webdataset.ShardWriter``
(no manifest of ours) get one, then train and evaluate as they are; other label conventions (a
json field, a folder in the key) map through options; a rule that finds no label names the
members the samples do have; samples with no image or no label are listed and passed over."""

import json
from pathlib import Path

import pytest
import webdataset as wds
from datasets import lfw_faces, toy_fake
from PIL import Image

from deepfake_dist.cli import main
from deepfake_dist.config import DataConfig, load_config
from deepfake_dist.data.index import index_set
from deepfake_dist.data.loader import EvalOptions, eval_loader, train_loader
from deepfake_dist.data.manifest import load_manifest, verify
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation import evaluate
from deepfake_dist.options import EvaluateOptions
from deepfake_dist.train.loop import train

SPLIT_SIZES = {"train": 48, "val": 12, "test": 12}
SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
FOLDER_LABELS = r"^(?:(?P<real>original)|(?P<fake>manipulated))/"


def _faces(n: int, offset: int = 0):
    """(image, label) pairs: real LFW faces and toy fakes in turn, RGB at 32 px."""
    faces = lfw_faces()
    for i in range(n):
        face = faces[(i + offset) % len(faces)]
        label = i % 2
        pixels = toy_fake(face, i) if label else face
        yield Image.fromarray(pixels).convert("RGB").resize((32, 32)), label


def _stock_set(folder, sample) -> None:
    """A set as a stock ShardWriter writes it: ``stock-{split}-NNNNNN.tar``, 24 samples a shard,
    each sample from ``sample(i, image, label)`` (encoded by webdataset's own encoders)."""
    folder.mkdir(parents=True)
    offset = 0
    for split, n in SPLIT_SIZES.items():
        with wds.ShardWriter(str(folder / f"stock-{split}-%06d.tar"), maxcount=24, verbose=0) as sink:
            for i, (image, label) in enumerate(_faces(n, offset)):
                sink.write(sample(offset + i, image, label))
        offset += n


def test_a_stock_webdataset_set_is_indexed_then_trains_and_evaluates(tmp_path, capsys):
    stock = tmp_path / "stock"
    _stock_set(stock, lambda i, image, label: {"__key__": f"s{i:05d}", "jpg": image, "cls": label})
    with pytest.raises(UserError, match="has no manifest.json .*shards index"):
        load_manifest(stock)
    assert main(["shards", "index", str(stock), "--split-from-name"]) == 0
    manifest = load_manifest(stock)
    assert {s: manifest["counts"][s]["total"] for s in SPLIT_SIZES} == SPLIT_SIZES
    assert manifest["counts"]["train"]["fake"] == 24 and manifest["format"] == "jpg" and manifest["channels"] == 3
    assert manifest["indexed"]["image_sizes"] == {"32x32": 72} and manifest["unusable"] == []
    assert [s["file"] for s in manifest["shards"]][:2] == ["stock-train-000000.tar", "stock-train-000001.tar"]
    assert "labels" in capsys.readouterr().out and verify(stock) == []

    cfg = load_config(SMOKE, [f"data.train=[{stock}]", f"output_dir={tmp_path / 'runs'}", "wandb.mode=disabled",
                              "train.epochs=2"])
    summary = train(cfg)
    assert summary["skipped samples"] == 0 and summary["unreadable shards"] == 0 and summary["ranks agree"]
    result = evaluate(EvaluateOptions(checkpoints=[str(cfg.run_dir)], data=[str(stock)], out=str(tmp_path / "eval"),
                                      robustness=False, explain=False, report=False, batch_size=8, workers=0),
                      command="test")
    row = result["rows"][0]
    assert row["test_images"] == 12 and row["auroc"] > 0.5


def test_labels_in_a_json_field_or_a_folder_of_the_key(tmp_path):
    by_json = tmp_path / "by_json"
    _stock_set(by_json, lambda i, image, label: {
        "__key__": f"s{i:05d}", "png": image, "json": {"label": ("real", "fake")[label], "id": i}})
    with pytest.raises(UserError, match=r"no sample of stock-train-000000.tar has a label by member 'cls'; its "
                                        r"samples hold the members json, png \(its json fields: id, label\)"):
        index_set(str(by_json), split_from_name=True)
    manifest = index_set(str(by_json), label_key="json:label", split_from_name=True)
    assert manifest["counts"]["train"] == {"real": 24, "fake": 24, "total": 48}

    by_folder = tmp_path / "by_folder"
    _stock_set(by_folder, lambda i, image, label: {"__key__": f"{('original', 'manipulated')[label]}/{i:05d}",
                                                   "png": image})
    with wds.TarWriter(str(by_folder / "extra.tar")) as sink:  # a sample with no image: listed, then passed over
        sink.write({"__key__": "original/extra", "png": next(_faces(1))[0]})
        sink.write({"__key__": "original/lost", "cls": 0})
    manifest = index_set(str(by_folder), label_from_path=FOLDER_LABELS)
    assert manifest["counts"]["train"] == {"real": 37, "fake": 36, "total": 74}  # no --split-from-name: all train
    assert [(u["shard"], u["key"]) for u in manifest["unusable"]] == [("extra.tar", "original/lost")]
    assert json.loads((by_folder / "manifest.json").read_text())["labels"] == {"key_pattern": FOLDER_LABELS}
    assert verify(by_folder) == []
    loader, stream = train_loader(DataConfig(train=[str(by_folder)], resolution=32, batch_size=8, num_workers=0), 3,
                                  0, 1, seed=0)
    stream.set_epoch(0)
    assert all(not batch.problems for batch in loader)
    keys = [k for batch in eval_loader([str(by_folder)], "train", EvalOptions(32, 3, batch_size=8)) for k in batch.key]
    assert len(keys) == 73 and "by_folder/original/extra" in keys and "by_folder/original/lost" not in keys
