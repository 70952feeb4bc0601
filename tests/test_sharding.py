"""Sharding: sources -> prepare -> WebDataset shards + manifest -> verify / info."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from deepfake_dist.data.common import SPLITS
from deepfake_dist.data.imageio import decode
from deepfake_dist.data.manifest import info_table, load_manifest, shard_urls, split_count, verify
from deepfake_dist.data.prepare import prepare
from deepfake_dist.data.sources import open_source
from deepfake_dist.errors import UserError
from deepfake_dist.options import PrepareOptions

ROOT = Path(__file__).resolve().parents[1]


def read_set(set_dir: Path) -> dict[str, tuple[str, int, np.ndarray, dict]]:
    """Every sample, read back through webdataset as a trainer would:
    key -> (split, label, pixels, meta)."""
    manifest = load_manifest(set_dir)
    samples = {}
    for split in SPLITS:
        urls = shard_urls(set_dir, split)
        if not urls:
            continue
        # no image decoder: webdataset's "pil" would turn grey into RGB
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
            assert s["__key__"] not in samples, f"duplicate key {s['__key__']}"
            pixels = np.asarray(decode(s[manifest["format"]]))
            samples[s["__key__"]] = (split, int(s["cls"]), pixels, s["json"])
    return samples


def label_counts(samples, split: str) -> dict[str, int]:
    labels = [label for sp, label, _, _ in samples.values() if sp == split]
    return {"real": labels.count(0), "fake": labels.count(1), "total": len(labels)}


# ---------------------------------------------------------------------------------- layouts


def test_folder_real_fake_layout_split_by_fractions(face_folder, tmp_path):
    out = tmp_path / "set"
    manifest = prepare(PrepareOptions(source=f"folder:{face_folder}", out=out, resolution=32, shard_size=4,
                                      split=(0.5, 0.25, 0.25)))
    samples = read_set(out)
    # 12 real + 8 fake, split per label: real 6/3/3, fake 4/2/2
    assert manifest["counts"] == {
        "train": {"real": 6, "fake": 4, "total": 10},
        "val": {"real": 3, "fake": 2, "total": 5},
        "test": {"real": 3, "fake": 2, "total": 5},
    }
    for split in SPLITS:
        assert label_counts(samples, split) == manifest["counts"][split]
    assert len(samples) == 20
    for key, (_, label, pixels, meta) in samples.items():
        assert label == (1 if meta["path"].startswith("fake/") else 0), key
        assert meta["label"] == ("fake" if label else "real")
        assert pixels.shape == (32, 32, 3)
    generators = {meta["path"]: meta.get("generator") for _, _, _, meta in samples.values()}
    assert generators["fake/gan_a/g_000.png"] == "gan_a"
    assert generators["fake/f_000.jpg"] == "unknown"
    assert generators["real/r_000.jpg"] is None
    assert (manifest["channels"], manifest["mode"], manifest["format"]) == (3, "RGB", "png")  # png is the default


def test_folder_fixed_split_layout(split_face_folder, split_face_counts, tmp_path):
    out = tmp_path / "set"
    manifest = prepare(PrepareOptions(source=f"folder:{split_face_folder}", out=out, resolution=16, format="png", shard_size=3))
    samples = read_set(out)
    for split in SPLITS:
        expected = {label: split_face_counts[(split, label)] for label in ("real", "fake")}
        expected["total"] = sum(expected.values())
        assert manifest["counts"][split] == expected
        assert label_counts(samples, split) == expected
    for split, label, pixels, meta in samples.values():
        assert meta["path"].startswith(f"{split}/{'fake' if label else 'real'}/")
        assert pixels.shape == (16, 16, 3)
    assert manifest["split"]["assigned_by_fractions"] == 0


def test_flat_folder_needs_label(flat_face_folder, tmp_path):
    with pytest.raises(UserError, match="--label real or --label fake"):
        prepare(PrepareOptions(source=f"folder:{flat_face_folder}", out=tmp_path / "set"))
    assert not (tmp_path / "set").exists()
    manifest = prepare(PrepareOptions(source=f"folder:{flat_face_folder}", out=tmp_path / "set", label="fake",
                                      split="1,0,0", resolution=16))
    assert manifest["counts"]["train"] == {"real": 0, "fake": 6, "total": 6}
    assert all(label == 1 for _, label, _, _ in read_set(tmp_path / "set").values())


def test_builtin_lfw_is_100_grey_real_faces(tmp_path):
    from skimage.data import lfw_subset

    out = tmp_path / "lfw"
    manifest = prepare(PrepareOptions(source="builtin:lfw", out=out, shard_size=40))
    assert manifest["counts"] == {
        "train": {"real": 80, "fake": 0, "total": 80},
        "val": {"real": 10, "fake": 0, "total": 10},
        "test": {"real": 10, "fake": 0, "total": 10},
    }
    assert (manifest["channels"], manifest["mode"]) == (1, "L")
    samples = read_set(out)
    assert len(samples) == 100 and all(label == 0 for _, label, _, _ in samples.values())
    _, _, pixels, meta = samples["lfw-007"]
    assert pixels.shape == (64, 64)  # grey stays grey: one channel
    assert meta == {"source": "lfw", "id": 7, "label": "real", "dataset": "skimage.data.lfw_subset"}
    face = Image.fromarray((lfw_subset()[7] * 255).round().astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.abs(pixels.astype(int) - np.asarray(face, dtype=int)).mean() < 3  # only JPEG loss


def test_celeba_uses_official_split_and_attributes(celeba_folder, tmp_path):
    out = tmp_path / "celeba_set"
    # the split given is ignored: CelebA has an official one
    manifest = prepare(PrepareOptions(source=f"celeba:{celeba_folder}", out=out, resolution=32, split=(1, 0, 0)))
    assert {s: manifest["counts"][s]["total"] for s in SPLITS} == {"train": 4, "val": 3, "test": 2}
    samples = read_set(out)
    assert sorted(k for k, v in samples.items() if v[0] == "val") == ["celeba-000005", "celeba-000006", "celeba-000007"]
    _, label, pixels, meta = samples["celeba-000002"]
    assert label == 0 and pixels.shape == (32, 32, 3)
    assert meta["id"] == "000002.jpg"
    assert meta["attributes"] == {"Male": 1, "Smiling": 0, "Young": 1}  # +1 -> 1, -1 -> 0
    assert meta["bbox"] == [11, 21, 101, 121]
    # listed in the partition file but not on disk: recorded, not silently dropped
    assert [s["input"].endswith("000010.jpg") for s in manifest["skipped"]] == [True]


def test_celeba_missing_partition_file_is_named(celeba_folder, tmp_path):
    (celeba_folder / "list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match="list_eval_partition.txt"):
        prepare(PrepareOptions(source=f"celeba:{celeba_folder}", out=tmp_path / "set"))


@pytest.mark.parametrize(
    "spec, message",
    [("foldr:x", "did you mean 'folder'"), ("lfw", "KIND:ARG"), ("builtin:lfv", "did you mean 'lfw'"),
     ("folder:/no/such/dir", "/no/such/dir")],
)
def test_bad_source_specs(spec, message, tmp_path):
    with pytest.raises(UserError, match=message):
        prepare(PrepareOptions(source=spec, out=tmp_path / "set"))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"split": "0.8,0.3,0.1"}, "--split"), ({"format": "gif"}, "--format"), ({"workers": 0}, "--workers"),
     ({"label": "fakes"}, "--label")],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        prepare(PrepareOptions(source="builtin:lfw", out=tmp_path / "set", **kwargs))


# ---------------------------------------------------------------------------------- manifest


def test_manifest_matches_files(face_folder, tmp_path):
    out = tmp_path / "set"
    manifest = prepare(PrepareOptions(source=f"folder:{face_folder}", out=out, resolution=16, shard_size=3,
                                      format="jpg"), command="deepfake-dist prepare x")
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    for split in SPLITS:  # contiguous names from 000000, in manifest order
        names = [s["file"] for s in manifest["shards"] if s["split"] == split]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
        assert split_count(manifest, split) == sum(s["samples"] for s in manifest["shards"] if s["split"] == split)
        assert shard_urls(out, split) == [str(out / n) for n in names]
    assert split_count(manifest, "train", "fake") == manifest["counts"]["train"]["fake"]
    assert load_manifest(out / "manifest.json") == manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["created"]["command"] == "deepfake-dist prepare x"
    assert manifest["preprocessing"] == {"exif_transpose": True, "crop": "center", "resize_filter": "bicubic",
                                         "jpeg_quality": 95, "jpeg_subsampling": "4:2:0"}
    assert manifest["name"] == "set" and len(manifest["id"]) == 16
    text = _render(info_table(manifest))
    assert manifest["id"] in text and "folder:" in text and "train" in text


def _render(table) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


def test_load_manifest_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*deepfake-dist prepare"):
        load_manifest(tmp_path / "empty")


def test_corrupt_inputs_are_skipped_and_named(face_folder, tmp_path):
    good = (face_folder / "real" / "r_000.jpg").read_bytes()
    (face_folder / "real" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (face_folder / "fake" / "notes.jpg").write_text("not an image")
    out = tmp_path / "set"
    manifest = prepare(PrepareOptions(source=f"folder:{face_folder}", out=out, resolution=16, shard_size=4))
    skipped = {Path(s["input"]).name: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["broken.jpg", "notes.jpg"]
    assert "truncated" in skipped["broken.jpg"].lower() and "cannot identify" in skipped["notes.jpg"]
    assert sum(manifest["counts"][s]["total"] for s in SPLITS) == 20  # 22 inputs, 2 skipped
    assert len(read_set(out)) == 20
    assert verify(out) == []


# ---------------------------------------------------------------------------------- verify


@pytest.fixture
def lfw_set(tmp_path) -> Path:
    out = tmp_path / "lfw"
    prepare(PrepareOptions(source="builtin:lfw", out=out, resolution=16, shard_size=25))
    return out


def test_verify_passes_then_names_a_flipped_shard(lfw_set):
    assert verify(lfw_set) == []
    target = lfw_set / "train-000001.tar"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = verify(lfw_set)
    assert problems and all(p.startswith("train-000001.tar") for p in problems), problems
    assert any("sha256" in p for p in problems)


def test_verify_names_a_removed_and_an_unlisted_shard(lfw_set):
    (lfw_set / "val-000000.tar").unlink()
    shutil.copy(lfw_set / "test-000000.tar", lfw_set / "test-000007.tar")
    problems = verify(lfw_set)
    assert any(p.startswith("val-000000.tar") and "missing" in p for p in problems), problems
    assert any(p.startswith("test-000007.tar") and "not listed" in p for p in problems), problems
    with pytest.raises(UserError, match="val-000000.tar"):
        shard_urls(lfw_set, "val")


def test_rerun_needs_overwrite(lfw_set):
    before = load_manifest(lfw_set)
    with pytest.raises(UserError, match="--overwrite"):
        prepare(PrepareOptions(source="builtin:lfw", out=lfw_set))
    assert load_manifest(lfw_set) == before and verify(lfw_set) == []  # untouched
    (lfw_set / "notes.txt").write_text("mine")
    manifest = prepare(PrepareOptions(source="builtin:lfw", out=lfw_set, resolution=16, shard_size=100, overwrite=True))
    assert len(manifest["shards"]) == 3  # the old 6 shards are gone, not mixed in
    assert verify(lfw_set) == []
    assert (lfw_set / "notes.txt").read_text() == "mine"  # only prepare's own files are replaced


# ---------------------------------------------------------------------------------- parallel


@pytest.mark.slow
def test_two_workers_write_the_same_set_as_one(face_folder, tmp_path):
    one = prepare(PrepareOptions(source=f"folder:{face_folder}", out=tmp_path / "one", resolution=16, shard_size=3))
    two = prepare(PrepareOptions(source=f"folder:{face_folder}", out=tmp_path / "two", resolution=16, shard_size=3, workers=2))
    a, b = read_set(tmp_path / "one"), read_set(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        assert a[key][:2] == b[key][:2] and a[key][3] == b[key][3]
        np.testing.assert_array_equal(a[key][2], b[key][2])
    # the layout is planned before the work is split, so the bytes are identical too
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["id"] == two["id"] and two["created"]["workers"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_under_accelerate_launch_match_one_process(face_folder, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip(f"no accelerate launcher beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [f"folder:{face_folder}", str(tmp_path / "ranks"), "--shard-size", "3"]
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process (its simple launcher);
    # --multi_gpu goes through torchrun, and with no GPU visible prepare() joins a gloo group.
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(ROOT / "tests" / "sharding_launch.py"), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = load_manifest(tmp_path / "ranks")
    single = prepare(PrepareOptions(source=f"folder:{face_folder}", out=tmp_path / "single", shard_size=3))
    assert ranks["created"]["world_size"] == 2
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == [
        f"rank 0 id {ranks['id']}", f"rank 1 id {ranks['id']}"]  # every rank got the manifest back
    assert ranks["id"] == single["id"] and ranks["counts"] == single["counts"]
    assert [(s["file"], s["sha256"]) for s in ranks["shards"]] == [(s["file"], s["sha256"]) for s in single["shards"]]
    assert verify(tmp_path / "ranks") == []
    assert not (tmp_path / "ranks" / ".tmp").exists()


def test_open_source_items_are_lazy_and_keys_safe(face_folder):
    source = open_source(f"folder:{face_folder}")
    assert len(source) == 20 and source.channels is None
    for item in source:
        assert item.split is None and "." not in item.key and "/" not in item.key
    assert isinstance(source.items[0].load(), Image.Image)
