"""Shard sets on an HTTP server and an S3 API server, both real and on 127.0.0.1 (tests/netstores.py):
shards stream like local ones, a connection cut mid-shard is resumed with a range request, a
missing shard is counted (skip) or named (raise), ``prepare`` writes to S3 with the manifest
last, ``shards verify`` / ``info`` read either, and two gloo processes train and evaluate from
each with the same weights and scores as from the local copy."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from netstores import http_store, s3_store, upload_folder
from scale_setup import ENV, accelerate, free_port

from deepfake_dist.cli import main
from deepfake_dist.config import DataConfig
from deepfake_dist.data import locations
from deepfake_dist.data.loader import train_loader
from deepfake_dist.data.manifest import load_manifest, shard_urls, verify
from deepfake_dist.data.prepare import prepare
from deepfake_dist.data.tarstream import tar_samples
from deepfake_dist.errors import UserError
from deepfake_dist.options import PrepareOptions

ROOT = Path(__file__).resolve().parent.parent


def _data(location, **kw) -> DataConfig:
    return DataConfig(train=[str(location)], **({"resolution": 32, "batch_size": 8, "num_workers": 0,
                                                 "shuffle_buffer": 16} | kw))


def _epoch(location, **kw):
    loader, stream = train_loader(_data(location, **kw), 1, 0, 1, seed=0)
    stream.set_epoch(0)
    batches = list(loader)
    return [(b.key, b.image) for b in batches], [p for b in batches for p in b.problems]


def test_http_shards_stream_as_local_ones_and_a_cut_connection_resumes(face_shards):
    with http_store(face_shards.parent) as store:
        url = f"{store.url}/faces"
        store.cut = "fresh"
        shard = shard_urls(url, "train")[0]
        local = list(tar_samples(face_shards / "train-000000.tar"))
        remote = list(tar_samples(shard))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in remote] == \
            [{k: v for k, v in s.items() if k != "__url__"} for s in local]
        assert ("faces/train-000000.tar", 0) in store.log
        resumed = [start for path, start in store.log if path == "faces/train-000000.tar" and start]
        assert resumed and resumed[0] == len(locations.read_bytes(face_shards / "train-000000.tar")) // 2

        store.log.clear()
        here, problems = _epoch(face_shards)
        there, remote_problems = _epoch(url)
        assert not problems and not remote_problems
        assert [k for k, _ in here] == [k for k, _ in there]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(here, there))
        assert any(start for _, start in store.log)  # shards read through cuts, resumed

        assert verify(url) == []
        assert load_manifest(url + "/manifest.json")["id"] == load_manifest(face_shards)["id"]


def test_http_errors_name_the_url(face_shards, monkeypatch):
    with http_store(face_shards.parent) as store:
        with pytest.raises(FileNotFoundError, match=f"{store.url}/faces/nothing.tar: HTTP 404"):
            locations.read_bytes(f"{store.url}/faces/nothing.tar")
        with pytest.raises(UserError, match="has no manifest.json .*shards index"):
            load_manifest(f"{store.url}/elsewhere")
        monkeypatch.setattr(locations, "RETRIES", 2)
        store.cut = "all"  # no byte ever arrives: bounded retries, then an error naming the URL
        with pytest.raises(OSError, match=f"{store.url}/faces/train-000001.tar: the connection failed 3 times"):
            list(tar_samples(f"{store.url}/faces/train-000001.tar"))
        with pytest.raises(UserError, match="HTTP location cannot be listed"):
            locations.list_names(store.url)
        with pytest.raises(UserError, match="read-only"):
            prepare(PrepareOptions(source="builtin:lfw", out=f"{store.url}/new"))


def test_a_missing_http_shard_is_counted_or_named(face_shards):
    with http_store(face_shards.parent) as store:
        url = f"{store.url}/faces"
        store.missing.add("faces/train-000002.tar")
        batches, problems = _epoch(url)
        assert batches and problems
        assert {p.shard for p in problems} == {f"{url}/train-000002.tar"}
        assert "404" in problems[0].reason and not problems[0].sample
        with pytest.raises(UserError, match=rf"{url}/train-000002.tar is unreadable .*404"):
            _epoch(url, on_error="raise")
        assert any("train-000002.tar" in p for p in verify(url))


def test_prepare_writes_to_s3_manifest_last_and_verify_reads_it(face_folder, tmp_path, monkeypatch, capsys):
    writes = []  # the URL of every file written, in order

    def recorded(name, url_at):
        real = getattr(locations, name)
        monkeypatch.setattr(locations, name, lambda *args: (writes.append(str(args[url_at])), real(*args))[1])

    recorded("upload", 1)
    recorded("write_bytes", 0)
    with s3_store("sets"):
        here = prepare(PrepareOptions(source=f"folder:{face_folder}", out=str(tmp_path / "local" / "faces"), resolution=16,
                                      shard_size=4))
        there = prepare(PrepareOptions(source=f"folder:{face_folder}", out="s3://sets/v1/faces", resolution=16, shard_size=4))
        assert there["id"] == here["id"] and there["name"] == "faces"
        remote = [w for w in writes if w.startswith("s3://")]
        assert remote[-1] == "s3://sets/v1/faces/manifest.json"
        assert sum(w.endswith(".tar") for w in remote) == len(there["shards"])  # each uploaded as it closed
        assert locations.list_names("s3://sets/v1/faces", folders=True) == sorted(
            ["manifest.json", *(s["file"] for s in there["shards"])])  # no .tmp left
        assert verify("s3://sets/v1/faces") == []
        assert main(["shards", "info", "s3://sets/v1/faces"]) == 0 and here["id"] in capsys.readouterr().out
        with pytest.raises(UserError, match="not empty; pass --overwrite"):
            prepare(PrepareOptions(source=f"folder:{face_folder}", out="s3://sets/v1/faces"))
        for shard in here["shards"]:  # the same shards without their manifest, indexed where they are
            locations.upload(tmp_path / "local" / "faces" / shard["file"], f"s3://sets/bare/{shard['file']}")
        assert main(["shards", "index", "s3://sets/bare", "--split-from-name"]) == 0
        assert load_manifest("s3://sets/bare")["counts"] == here["counts"] and verify("s3://sets/bare") == []

        shard = "s3://sets/v1/faces/" + there["shards"][0]["file"]
        data = bytearray(locations.read_bytes(shard))
        data[len(data) // 2] ^= 0xFF
        locations.write_bytes(shard, bytes(data))
        locations.upload(tmp_path / "local" / "faces" / "test-000000.tar", "s3://sets/v1/faces/extra.tar")
        problems = verify("s3://sets/v1/faces")
        assert any(p.startswith(there["shards"][0]["file"]) and "sha256" in p for p in problems), problems
        assert any(p.startswith("extra.tar") and "not listed" in p for p in problems), problems
        with pytest.raises(UserError, match="NoSuchBucket|no manifest.json"):
            load_manifest("s3://nobucket/faces")


@pytest.mark.slow
def test_two_processes_train_and_evaluate_from_http_and_s3_as_from_the_folder(face_shards, tmp_path):
    with http_store(face_shards.parent) as store, s3_store("sets"):
        upload_folder(face_shards, "s3://sets/copies/faces")
        store.cut = "fresh"  # every shard read from its start is cut halfway and resumed
        out = tmp_path / "runs"
        cmd = accelerate("--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"),
                         "--main_process_port", str(free_port()), str(ROOT / "tests" / "locations_launch.py"),
                         str(out), str(face_shards), f"{store.url}/faces", "s3://sets/copies/faces")
        done = subprocess.run(cmd, env={**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert any(start for _, start in store.log)
    results = json.loads((out / "results.json").read_text())
    digests = {name: json.loads((out / name / "summary.json").read_text())["rank_digests"] for name in results["train"]}
    assert len(digests["local"]) == 2 and len(set(digests["local"])) == 1
    assert digests["http"] == digests["local"] == digests["s3"]
    assert all(summary["unreadable shards"] == 0 for summary in results["train"].values())
    rows = results["evaluate"]
    assert rows["local"]["test_images"] > 0 and rows["local"]["world_size"] == 2
    for key in ("auroc", "accuracy", "test_images", "eer"):
        assert rows["http"][key] == rows["local"][key] == rows["s3"][key], key
    shutil.rmtree(out)
