"""FaceForensics++, Celeb-DF v2, DFDC and DFDCP as ``prepare`` sources, on tiny replicas of their
published layouts (``benchmark_replicas``): the official splits to the video, no video, identity
or fake/original pair in two splits, Celeb-DF's inverted test labels, one line for a layout that
is not the dataset's, short and faceless videos listed, RGB kept, and the samples' json read by
evaluation per method and per video."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfake_dist.cli import main
from deepfake_dist.data.common import LABEL_NAMES
from deepfake_dist.data.manifest import shard_urls, verify
from deepfake_dist.data.prepare import prepare
from deepfake_dist.options import PrepareOptions
from deepfake_dist.data.sources import open_source
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.sources import per_source
from deepfake_dist.evaluation.video import video_predictions
from deepfake_dist.evaluation.predictions import Predictions

pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
import benchmark_replicas as replicas  # noqa: E402 - after the skip: it imports cv2

FAST = {"frames": 4}  # 4 of each replica video's 8 frames


@pytest.fixture(scope="module")
def ffpp(tmp_path_factory) -> replicas.Replica:
    return replicas.build_ffpp(tmp_path_factory.mktemp("ffpp") / "FaceForensics++")


@pytest.fixture(scope="module")
def celebdf(tmp_path_factory) -> replicas.Replica:
    return replicas.build_celebdf(tmp_path_factory.mktemp("celebdf") / "Celeb-DF-v2")


@pytest.fixture(scope="module")
def dfdc(tmp_path_factory) -> replicas.Replica:
    return replicas.build_dfdc(tmp_path_factory.mktemp("dfdc") / "DFDC")


@pytest.fixture(scope="module")
def dfdcp(tmp_path_factory) -> replicas.Replica:
    return replicas.build_dfdcp(tmp_path_factory.mktemp("dfdcp") / "DFDCP")


@pytest.fixture(scope="module")
def ffpp_set(ffpp, tmp_path_factory) -> Path:
    """Two methods of the FF++ replica, prepared through the command line."""
    out = tmp_path_factory.mktemp("shards") / "ffpp"
    assert main(["prepare", "--source", f"ffpp:{ffpp.root}", "--out", str(out), "--compression", "c23",
                 "--methods", "Deepfakes,faceswap", "--frames", "4", "--resolution", "32"]) == 0
    return out


def _counts(source, by: str = "label") -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for item in source.items:
        counts[item.split][LABEL_NAMES[item.label] if by == "label" else "videos"] += 1
    return {split: dict(c) for split, c in counts.items()}


def _expected(replica: replicas.Replica) -> dict[str, dict[str, int]]:
    return {split: {k: n for k, n in c.items() if n} for split, c in replica.counts.items() if any(c.values())}


def _skipped(source_or_manifest, root: Path) -> dict[str, str]:
    skipped = source_or_manifest["skipped"] if isinstance(source_or_manifest, dict) else source_or_manifest.skipped
    return {Path(s["input"]).relative_to(root).as_posix(): s["reason"] for s in skipped}


def _samples(set_dir: Path, split: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(shard_urls(set_dir, split), shardshuffle=False))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------- splits


def test_ffpp_follows_the_official_pairs(ffpp):
    source = open_source(f"ffpp:{ffpp.root}", options=FAST)
    assert _counts(source) == _expected(ffpp)
    skipped = _skipped(source, ffpp.root)
    assert set(skipped) == set(ffpp.skipped) and all("no pair" in r for r in skipped.values())
    pairs = {split: json.loads((ffpp.root / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    pair_of = {i: (split, frozenset(p)) for split, ps in pairs.items() for p in ps for i in p}
    for item in source.items:
        ids = Path(item.meta["path"]).stem.split("_")
        assert {pair_of[i][0] for i in ids} == {item.split}  # a real in its pair's split, a fake with its pair
        assert item.meta["compression"] == "c23" and item.meta["dataset"] == "FaceForensics++"
        assert item.meta["method"] == ("youtube" if item.label == 0 else item.meta["generator"])
    assert {i.meta["method"] for i in source.items} == {"youtube", *replicas.CLASSIC}
    manifest_about = source.preprocessing["dataset"]
    assert manifest_about["methods"] == list(replicas.CLASSIC) and sorted(manifest_about["split_files"]) == [
        "test.json", "train.json", "val.json"]


def test_celebdf_tests_its_list_with_inverted_labels_and_splits_the_rest_by_identity(celebdf):
    source = open_source(f"celebdf:{celebdf.root}", options=FAST)
    assert _counts(source) == _expected(celebdf)
    by_path = {i.meta["path"]: i for i in source.items}
    # the list says "1 Celeb-real/id0_0001.mp4" and "0 Celeb-synthesis/...": 1 is real
    assert by_path["Celeb-real/id0_0001.mp4"].label == 0 and by_path["Celeb-real/id0_0001.mp4"].split == "test"
    assert by_path["Celeb-synthesis/id1_id0_0001.mp4"].label == 1
    assert by_path["YouTube-real/00000.mp4"].split == "test" and by_path["YouTube-real/00000.mp4"].label == 0
    sides = defaultdict(set)
    for item in source.items:
        if item.split != "test":
            for identity in item.meta.get("identities", []):
                sides[identity].add(item.split)
    assert len(sides) == 5 and all(len(s) == 1 for s in sides.values())  # no identity in train and val
    skipped = _skipped(source, celebdf.root)
    straddling = [p for p, r in skipped.items() if "both sides of the train/val split" in r]
    assert len(straddling) == 2 and "missing" in skipped["Celeb-synthesis/id3_id9_0009.mp4"]


def test_dfdc_keeps_each_fake_with_its_original(dfdc):
    source = open_source(f"dfdc:{dfdc.root}", options=FAST)
    assert _counts(source) == _expected(dfdc)
    split_of = {Path(i.meta["path"]).name: i.split for i in source.items}
    fakes = [i for i in source.items if i.label == 1 and "original" in i.meta]
    assert len(fakes) == 5 and all(split_of[f.meta["original"]] == f.split for f in fakes)
    assert {i.meta["part"] for i in fakes} == {"dfdc_train_part_0", "dfdc_train_part_1"}  # part 1 unpacked deeper
    assert {i.split for i in source.items if i.meta["path"].startswith("test/")} == {"test"}
    assert "missing" in _skipped(source, dfdc.root)["test/gone.mp4"]


def test_dfdcp_uses_its_sets_and_lists_what_is_missing_or_unlisted(dfdcp):
    source = open_source(f"dfdcp:{dfdcp.root}", options=FAST)
    assert _counts(source, by="videos") == _expected(dfdcp)
    index = json.loads((dfdcp.root / "dataset.json").read_text())
    for item in source.items:
        entry = index[item.meta["path"]]
        assert LABEL_NAMES[item.label] == entry["label"] and item.meta["method"] == item.meta["path"].split("/")[0]
        assert item.split == "test" if entry["set"] == "test" else item.split in ("train", "val")
    skipped = _skipped(source, dfdcp.root)
    assert {p: next(w for w in ("missing", "not listed") if w in r) for p, r in skipped.items()} == dfdcp.skipped


def test_no_video_is_in_two_splits(ffpp, celebdf, dfdc, dfdcp):
    for kind, replica in (("ffpp", ffpp), ("celebdf", celebdf), ("dfdc", dfdc), ("dfdcp", dfdcp)):
        items = open_source(f"{kind}:{replica.root}", options=FAST).items
        paths = [i.meta["path"] for i in items]
        assert len(paths) == len(set(paths)) == len({i.key for i in items}), kind


# ------------------------------------------------------------------------------ bad layouts


def test_a_missing_split_file_is_named(ffpp, celebdf, dfdc, dfdcp, tmp_path):
    for kind, replica, name in (("ffpp", ffpp, "val.json"), ("celebdf", celebdf, "List_of_testing_videos.txt"),
                                ("dfdc", dfdc, "test/labels.csv"), ("dfdcp", dfdcp, "dataset.json")):
        copy = tmp_path / kind
        shutil.copytree(replica.root, copy)
        (copy / name).unlink()
        with pytest.raises(UserError) as error:
            open_source(f"{kind}:{copy}")
        assert f"missing the split file {copy / name}" in _one_line(error)
    (tmp_path / "dfdc" / "train" / "dfdc_train_part_0" / "metadata.json").unlink()
    with pytest.raises(UserError, match="missing the split file .*dfdc_train_part_0/metadata.json"):
        open_source(f"dfdc:{tmp_path / 'dfdc'}")


def test_a_wrong_root_names_the_layout_and_what_is_there(ffpp, celebdf, tmp_path):
    with pytest.raises(UserError) as error:
        open_source(f"ffpp:{celebdf.root}")
    assert ("not the FaceForensics++ layout: no original_sequences/youtube/, manipulated_sequences/" in _one_line(error)
            and "found Celeb-real/, Celeb-synthesis/, List_of_testing_videos.txt, YouTube-real/" in str(error.value))
    for kind, expected in (("celebdf", "no Celeb-real/, Celeb-synthesis/, YouTube-real/"), ("dfdc", "no train/, test/"),
                           ("dfdcp", "no original_videos/, method_A/, method_B/")):
        with pytest.raises(UserError) as error:
            open_source(f"{kind}:{ffpp.root}")
        assert expected in _one_line(error) and "found manipulated_sequences/, original_sequences/" in str(error.value)
    with pytest.raises(UserError, match="folder .*nowhere does not exist"):
        open_source(f"dfdcp:{tmp_path / 'nowhere'}")


def test_a_missing_compression_level_or_method_says_what_there_is(ffpp, tmp_path):
    with pytest.raises(UserError) as error:
        open_source(f"ffpp:{ffpp.root}", options={"compression": "c40"})
    assert "no original_sequences/youtube/c40/videos: found c23" in _one_line(error)
    skeleton = tmp_path / "ffpp"
    (skeleton / "original_sequences/youtube/c23/videos").mkdir(parents=True)
    for method in replicas.CLASSIC:
        (skeleton / "manipulated_sequences" / method / "c40" / "videos").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        open_source(f"ffpp:{skeleton}")
    assert "no manipulated_sequences/*/c23/videos: found c40" in _one_line(error)
    with pytest.raises(UserError) as error:
        open_source(f"ffpp:{ffpp.root}", options={"methods": "Deepfakes,FaceShifter"})
    assert "no manipulated_sequences/FaceShifter/" in _one_line(error) and "--methods Deepfakes,Face2Face" in str(error.value)
    with pytest.raises(UserError, match="unknown method 'Deepfake' \\(did you mean 'Deepfakes'\\?\\)"):
        open_source(f"ffpp:{ffpp.root}", options={"methods": "Deepfake"})


def test_label_lists_and_options_that_do_not_apply_are_refused(celebdf, tmp_path):
    with pytest.raises(UserError, match="--compression: only for ffpp:PATH sources, not celebdf:"):
        open_source(f"celebdf:{celebdf.root}", options={"compression": "c23"})
    with pytest.raises(UserError, match="--label real: celebdf:.* gives each video's label"):
        open_source(f"celebdf:{celebdf.root}", label="real")
    copy = tmp_path / "cdf"
    shutil.copytree(celebdf.root, copy)
    listed = copy / "List_of_testing_videos.txt"
    listed.write_text(listed.read_text().replace("1 Celeb-real/id0_0001.mp4", "0 Celeb-real/id0_0001.mp4"))
    with pytest.raises(UserError) as error:
        open_source(f"celebdf:{copy}")
    assert "List_of_testing_videos.txt:1: label 0 (fake) for a video in Celeb-real/" in _one_line(error)
    assert "1 = real, 0 = fake" in str(error.value)


# --------------------------------------------------------------------------- prepared frames


def test_prepared_frames_record_dataset_method_compression_video_and_frame(ffpp_set):
    manifest = json.loads((ffpp_set / "manifest.json").read_text())
    assert verify(ffpp_set) == [] and manifest["resolution"] == 32 and manifest["frames"] is None
    assert manifest["preprocessing"]["dataset"]["methods"] == ["Deepfakes", "FaceSwap"]
    assert manifest["preprocessing"]["video"]["frame_level"] is True and manifest["shard_size"] == 32
    frames_of = defaultdict(list)
    for split in ("train", "val", "test"):
        for sample in _samples(ffpp_set, split):
            meta = json.loads(sample["json"])
            assert {meta["dataset"], meta["compression"], meta["source"]} == {"FaceForensics++", "c23", "ffpp"}
            assert sample["__key__"] == f"{meta['video']}-f{meta['frame']:06d}"
            assert meta["method"] in ("youtube", "Deepfakes", "FaceSwap")
            frames_of[meta["video"]].append(meta["frame"])
    assert len(frames_of) == 8 + 16 and all(sorted(f) == [1, 3, 5, 7] for f in frames_of.values())  # 4 of 8, spread


def test_evaluation_groups_them_per_method_and_per_video(ffpp_set):
    samples = _samples(ffpp_set, "test")
    metas = [json.loads(s["json"]) for s in samples]
    labels = torch.tensor([int(s["cls"]) for s in samples])
    scores = torch.where(labels == 1, 0.8, 0.2) + torch.linspace(-0.1, 0.1, len(samples))
    preds = Predictions(torch.logit(scores), labels, [f"ffpp/{s['__key__']}" for s in samples], metas)
    rows = {row["source"]: row["samples"] for row in per_source(preds, {"0.5": 0.5})}
    assert rows == {"fake/Deepfakes": 2 * 4, "fake/FaceSwap": 2 * 4, "real/ffpp": 2 * 4}
    videos = video_predictions(preds)
    assert len(videos.keys) == 6 and all(m["samples"] == 4 and "frame" not in m for m in videos.metas)
    assert {m["method"] for m in videos.metas} == {"youtube", "Deepfakes", "FaceSwap"}


def test_short_and_faceless_videos_are_listed_and_the_rest_is_prepared(dfdc, tmp_path):
    manifest = prepare(PrepareOptions(source=f"dfdc:{dfdc.root}", out=str(tmp_path / "dfdc"), resolution=32, workers=2,
                                      options=FAST))
    skipped = {Path(s["input"]).name: s for s in manifest["skipped"]}
    assert set(skipped) == {"gone.mp4", "noface.mp4", "short.mp4"}
    assert "no face found" in skipped["noface.mp4"]["reason"]
    assert skipped["short.mp4"]["reason"] == "short video: 2 frame(s), 2 sampled"
    assert skipped["short.mp4"]["part"] == "2 of 4 frames"
    test = Counter(json.loads(s["json"])["video"] for s in _samples(tmp_path / "dfdc", "test"))
    assert test == {"original-t0": 4, "original-t1": 4, "DFDC-t2": 4, "DFDC-t3": 4, "original-short": 2}
    assert manifest["counts"]["test"] == {"real": 10, "fake": 8, "total": 18}
    assert manifest["counts"]["val"]["total"] == 8 and manifest["counts"]["train"]["total"] == 32
    assert verify(tmp_path / "dfdc") == []


def test_a_set_kept_for_testing_holds_its_test_split_only(celebdf, tmp_path):
    """``--splits test``: the cross-dataset sets (Celeb-DF, DFDC, DFDCP) are prepared for testing
    only; the manifest's command says so."""
    out = tmp_path / "cdf"
    manifest = prepare(PrepareOptions(source=f"celebdf:{celebdf.root}", out=str(out), splits="test", resolution=32,
                                      options=FAST))
    assert {s: c["total"] for s, c in manifest["counts"].items()} == {"train": 0, "val": 0, "test": 3 * 4}
    assert "--splits test" in manifest["created"]["command"] and verify(out) == []
    with pytest.raises(UserError, match=r"^--splits test,tset: expected some of train,val,test, comma-separated$"):
        prepare(PrepareOptions(source=f"celebdf:{celebdf.root}", out=str(tmp_path / "x"), splits="test,tset"))
    root = _colour_dfdcp(tmp_path / "DFDCP")  # a test set only
    with pytest.raises(UserError, match="--splits train: dfdcp:.* has no input in train"):
        prepare(PrepareOptions(source=f"dfdcp:{root}", out=str(tmp_path / "x"), splits=["train"]))


def _colour_dfdcp(root: Path) -> Path:
    """A DFDCP layout holding one real test video, ``write_colour_video``'s."""
    for folder in ("method_A", "method_B"):
        (root / folder).mkdir(parents=True)
    replicas.write_colour_video(root / "original_videos" / "c.mp4")
    (root / "dataset.json").write_text(json.dumps({"original_videos/c.mp4": {"label": "real", "set": "test"}}))
    return root


def test_colour_stays_rgb_from_the_video_to_the_shard(tmp_path):
    root = _colour_dfdcp(tmp_path / "DFDCP")
    prepare(PrepareOptions(source=f"dfdcp:{root}", out=str(tmp_path / "out"), options={"frames": 2, "margin": 0.5}))
    (sample, _) = _samples(tmp_path / "out", "test")
    crop = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=float)
    assert crop.shape == (256, 256, 3)  # the benchmark datasets' size
    left, right = crop[:, :24].mean(axis=(0, 1)), crop[:, -24:].mean(axis=(0, 1))
    assert left[0] > left[2] + 100 and right[2] > right[0] + 100  # red left, blue right: not swapped
