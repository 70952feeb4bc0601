"""Videos into clip shards and the models that score them: real mp4 files (a real face moving over
a background whose grey level encodes the frame index, see ``video_data``) through
``prepare --source videos:``, the temporal detector and the ViT through the one trainer, and
video-level metrics through ``evaluate`` and ``predict``."""

import io
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfake_dist.cli import main
from deepfake_dist.config import AugmentConfig, load_config
from deepfake_dist.data.faces import VideoOptions, clip_indices, fill_boxes, largest_track
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.data.manifest import info_table, shard_urls, verify
from deepfake_dist.data.prepare import prepare
from deepfake_dist.data.transforms import TrainAugment
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.metrics import detection_metrics
from deepfake_dist.evaluation.predictions import Predictions
from deepfake_dist.evaluation.video import video_predictions
from deepfake_dist.models import create_model
from deepfake_dist.models.exported import load_exported
from deepfake_dist.options import EvaluateOptions, PrepareOptions
from deepfake_dist.train.loop import train

cv2 = pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
from video_data import level, write_video, write_video_folder  # noqa: E402 - after the skip: it imports cv2

ROOT = Path(__file__).resolve().parent.parent
CLIP = {"frames": 4, "clips_per_video": 3, "frame_step": 2, "margin": 0.5}  # 24-frame videos: 3 clips each


def _samples(set_dir: Path) -> dict[str, list[dict]]:
    """Every sample of a shard set by split, each as {member: bytes} (read as plain tars)."""
    import webdataset as wds

    urls = {split: shard_urls(set_dir, split) for split in ("train", "val", "test")}
    return {split: list(wds.WebDataset(u, shardshuffle=False)) if u else [] for split, u in urls.items()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """4 real and 4 fake (fake/swap/) 24-frame videos."""
    return write_video_folder(tmp_path_factory.mktemp("videos") / "v", real=4, fake=4)


@pytest.fixture(scope="module")
def clip_set(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "clips"
    prepare(PrepareOptions(source=f"videos:{videos}", out=out, resolution=32, shard_size=2, split="0.5,0.25,0.25", options=CLIP))
    return out


@pytest.fixture(scope="module")
def temporal_run(clip_set, tmp_path_factory) -> Path:
    """A temporal detector (tiny cnn frames, LSTM) trained in-process on the clip set."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs/temporal.yaml", [
        f"data.train=[{clip_set}]", f"output_dir={runs}", "wandb.mode=disabled", "model.backbone=cnn",
        "model.backbone_args={width: 8}", "model.hidden=16", "data.resolution=32", "data.batch_size=4",
        "data.num_workers=0", "train.epochs=2", "sched.warmup_steps=1"])
    train(cfg)
    return cfg.run_dir


# ----------------------------------------------------------------------------- sampling, tracking


def test_clips_are_sampled_every_nth_frame_or_uniformly():
    step = VideoOptions(frames=4, clips_per_video=3, frame_step=2, sampling="step")
    assert clip_indices(24, step) == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20, 22]]
    assert clip_indices(10, step) == [[1, 3, 5, 7]]  # room for one clip, centred
    assert clip_indices(6, step) == []
    uniform = VideoOptions(frames=4, clips_per_video=3, sampling="uniform")
    assert clip_indices(24, uniform) == [[1, 3, 5, 7], [9, 11, 13, 15], [17, 19, 21, 23]]
    assert clip_indices(10, uniform) == [[0, 1, 3, 4], [5, 6, 8, 9]]
    for bad in ({"frames": 0}, {"sampling": "random"}, {"margin": -1}, {"face_model": "/nonexistent.onnx"}):
        with pytest.raises(UserError, match="--" + next(iter(bad)).replace("_", "-")):
            VideoOptions(**bad)


def test_the_largest_face_track_is_kept_and_its_gaps_filled():
    face = {0: (10, 10, 40, 40), 1: (14, 11, 40, 40), 3: (22, 13, 40, 40)}  # missed on frame 2
    small = {i: (100, 5, 12, 12) for i in range(4)}  # a smaller face on every frame
    detections = {i: [b for b in (face.get(i), small[i]) if b] for i in range(4)}
    detections[1].append((100, 80, 30, 30))  # a one-frame false positive
    track = largest_track(detections)
    assert track == face
    assert fill_boxes([0, 2, 3, 5], track) == [face[0], (18, 12, 40, 40), face[3], face[3]]


# ------------------------------------------------------------------------------------ prepare


def test_clip_shards_hold_frames_in_order_with_boxes(clip_set):
    manifest = json.loads((clip_set / "manifest.json").read_text())
    assert manifest["frames"] == 4 and manifest["preprocessing"]["video"]["frames"] == 4
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 8 * 3
    assert manifest["skipped"] == [] and verify(clip_set) == []
    splits_of = defaultdict(set)
    for split, samples in _samples(clip_set).items():
        for sample in samples:
            meta = json.loads(sample["json"])
            assert sorted(k for k in sample if not k.startswith("__")) == ["cls", "f000.png", "f001.png", "f002.png",
                                                                           "f003.png", "json"]
            assert sample["__key__"] == f"{meta['video']}-c{meta['clip']:03d}"
            assert len(meta["boxes"]) == 4 and all(meta["detected"])
            frames = [np.asarray(Image.open(io.BytesIO(sample[f"f{i:03d}.png"]))) for i in range(4)]
            assert all(f.shape == (32, 32, 3) for f in frames)
            # the crop's corner is background, whose grey level says which frame it came from
            corners = [int(f[:2, :2].mean()) for f in frames]
            assert corners == sorted(corners)
            assert all(abs(c - level(i)) <= 6 for c, i in zip(corners, meta["frames"]))
            splits_of[meta["video"]].add(split)
    assert len(splits_of) == 8 and all(len(s) == 1 for s in splits_of.values())  # split by video
    loader = eval_loader([str(clip_set)], "train", EvalOptions.from_data(
        load_config(ROOT / "configs/temporal.yaml", [f"data.train=[{clip_set}]"]).data, 3))
    assert loader.dataset.sample_shape == (4, 3, 64, 64)
    assert next(iter(loader)).image.shape[1:] == (4, 3, 64, 64)


def test_videos_without_face_or_unreadable_are_skipped_and_counted(tmp_path):
    root = tmp_path / "v"
    write_video(root / "real" / "good.mp4", seed=1)
    write_video(root / "real" / "noface.mp4", face=False)
    write_video(root / "real" / "short.mp4", frames=5, seed=2)
    write_video(root / "fake" / "good.mp4", fake=True, seed=3)
    (root / "fake" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    manifest = prepare(PrepareOptions(source=f"videos:{root}", out=tmp_path / "out", resolution=32, split="1,0,0", options=CLIP))
    reasons = {Path(s["input"]).relative_to(root).as_posix(): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"real/noface.mp4", "real/short.mp4", "fake/corrupt.mp4"}
    assert "no face" in reasons["real/noface.mp4"] and "too short" in reasons["real/short.mp4"]
    assert "cannot open" in reasons["fake/corrupt.mp4"]
    assert manifest["counts"]["train"] == {"real": 3, "fake": 3, "total": 6}
    assert "skipped        3" in _render(info_table(manifest))


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_frame_level_set_from_a_csv(videos, tmp_path):
    listing = tmp_path / "videos.csv"
    listing.write_text(f"path,label,split\n{videos}/real/r0.mp4,real,train\n{videos}/fake/swap/f0.mp4,fake,train\n"
                       f"{videos}/real/r1.mp4,real,test\nmissing.mp4,fake,test\n")
    manifest = prepare(PrepareOptions(source=f"videos:{listing}", out=tmp_path / "frames", resolution=64,
                                      options=dict(CLIP, frame_level=True)))
    assert manifest["frames"] is None and [s["reason"] for s in manifest["skipped"]] == [
        "listed in videos.csv line 5 but missing"]
    assert manifest["counts"]["train"]["total"] == 2 * 12 and manifest["counts"]["test"]["total"] == 12
    for sample in _samples(tmp_path / "frames")["train"]:
        meta = json.loads(sample["json"])
        assert sample["__key__"] == f"{meta['video']}-f{meta['frame']:06d}" and "png" in sample
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)


def test_dnn_face_model_from_a_local_file(videos, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    box = np.array([[[[0, 1, 0.9, 0.25, 0.25, 0.5, 0.75]]]], np.float32)  # an SSD row: image, class, conf, x1..y2
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["data"], ["m"], keepdims=1), helper.make_node("Mul", ["m", "zero"], ["z"]),
         helper.make_node("Add", ["z", "box"], ["detection_out"])], "ssd",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 300, 300])],
        [helper.make_tensor_value_info("detection_out", TensorProto.FLOAT, [1, 1, 1, 7])],
        initializer=[numpy_helper.from_array(np.zeros(1, np.float32), "zero"), numpy_helper.from_array(box, "box")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "ssd.onnx")
    listing = tmp_path / "one.csv"
    listing.write_text(f"{videos}/real/r0.mp4,real,train\n")  # no header: path,label,split
    manifest = prepare(PrepareOptions(source=f"videos:{listing}", out=tmp_path / "dnn", resolution=32,
                                      options=dict(CLIP, face_model=str(tmp_path / "ssd.onnx"))))
    assert manifest["preprocessing"]["video"]["face_detector"]["kind"] == "dnn"
    meta = json.loads(_samples(tmp_path / "dnn")["train"][0]["json"])
    assert meta["boxes"][0] == [40.0, 30.0, 40.0, 60.0]  # the model's box on a 160x120 frame

    (tmp_path / "bad.onnx").write_bytes(b"not a network")
    with pytest.raises(UserError, match="--face-model .*bad.onnx"):
        prepare(PrepareOptions(source=f"videos:{listing}", out=tmp_path / "bad",
                               options={"face_model": str(tmp_path / "bad.onnx")}))
    with pytest.raises(UserError, match="--frames: only for .*videos:PATH"):
        prepare(PrepareOptions(source=f"folder:{videos}", out=tmp_path / "folder", options={"frames": 4}))


# ----------------------------------------------------------------------------- loader, models


def test_every_frame_of_a_clip_gets_the_same_augmentation():
    always = AugmentConfig(hflip=1, crop=1, crop_scale=(0.5, 0.6), jitter=1, jitter_strength=0.5, jpeg=1,
                           jpeg_quality=(20, 30), blur=1)
    frame = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = TrainAugment(32, always)(frame.expand(5, 3, 32, 32).clone())
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
    assert all(torch.equal(out[0], out[t]) for t in range(1, 5))
    assert (out[0].float() - frame.float()).abs().max() > 6  # it did change


def test_temporal_scores_depend_on_frame_order(clip_set):
    model = create_model("temporal", backbone="cnn", backbone_args={"width": 8}, hidden=16).eval()
    cfg = load_config(ROOT / "configs/temporal.yaml", [f"data.train=[{clip_set}]", "data.resolution=32"]).data
    clips = next(iter(eval_loader([str(clip_set)], "train", EvalOptions.from_data(cfg, 3)))).image
    with torch.no_grad():
        logits = model(clips)
        shuffled = model(clips[:, [2, 0, 3, 1]])
    assert logits.shape == (len(clips),) and not torch.allclose(logits, shuffled, atol=1e-5)


def test_image_models_refuse_clips(clip_set, tmp_path):
    with pytest.raises(UserError, match="model.name cnn: it scores single images but .* clips of 4 frames"):
        load_config(ROOT / "configs/cnn.yaml", [f"data.train=[{clip_set}]", f"output_dir={tmp_path}",
                                                "wandb.mode=disabled", "data.num_workers=0"])


def test_vit_trains_at_64_pixels_on_video_frames(videos, tmp_path):
    frames = tmp_path / "frames"
    prepare(PrepareOptions(source=f"videos:{videos}", out=frames, resolution=64, split="0.5,0.25,0.25",
                           options=dict(CLIP, frame_level=True, clips_per_video=1)))
    cfg = load_config(ROOT / "configs/vit.yaml", [
        f"data.train=[{frames}]", f"output_dir={tmp_path / 'runs'}", "wandb.mode=disabled", "model.depth=2",
        "model.dim=64", "model.heads=2", "data.batch_size=8", "data.num_workers=0", "train.max_steps=4",
        "sched.warmup_steps=1", "train.log_every=1"])
    summary = train(cfg)
    assert summary["steps"] == 4
    model, info = load_exported(cfg.run_dir)
    assert info["model"] == "vit" and info["resolution"] == 64 and info["frames"] is None
    assert info["video"]["frame_level"] is True
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2,)


# -------------------------------------------------------------------------- video-level scores


def test_video_scores_pool_their_samples(tmp_path):
    rows = [("a", 0, [0.1, 0.3, 0.2]), ("b", 1, [0.9, 0.4, 0.8, 0.7]), ("c", 0, [0.95, 0.1, 0.1])]
    keys, labels, scores, metas = [], [], [], []
    for video, label, values in rows:
        for i, s in enumerate(values):
            keys.append(f"set/{video}-f{i:06d}")
            labels.append(label)
            scores.append(s)
            metas.append({"video": video, "label": ("real", "fake")[label], "frame": i, "source": "videos"})
    keys.append("set/still")  # an image sample: not part of any video
    labels.append(1)
    scores.append(0.5)
    metas.append({})
    preds = Predictions(torch.logit(torch.tensor(scores)), torch.tensor(labels), keys, metas)

    mean = video_predictions(preds, "mean")
    assert mean.keys == ["set/a", "set/b", "set/c"] and mean.labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(mean.scores, torch.tensor([0.2, 0.7, 0.3833333]), atol=1e-5, rtol=0)
    assert [m["samples"] for m in mean.metas] == [3, 4, 3] and "frame" not in mean.metas[0]
    torch.testing.assert_close(video_predictions(preds, "median").scores, torch.tensor([0.2, 0.75, 0.1]),
                               atol=1e-5, rtol=0)
    maximum = video_predictions(preds, "max")
    torch.testing.assert_close(maximum.scores, torch.tensor([0.3, 0.9, 0.95]), atol=1e-5, rtol=0)

    by_mean = detection_metrics(mean.scores, mean.labels)
    assert by_mean["auroc"] == pytest.approx(1.0) and by_mean["accuracy"] == pytest.approx(1.0)
    by_max = detection_metrics(maximum.scores, maximum.labels)
    assert by_max["auroc"] == pytest.approx(0.5) and by_max["accuracy"] == pytest.approx(2 / 3)

    with pytest.raises(UserError, match="--video-aggregate mode"):
        video_predictions(preds, "mode")
    mixed = Predictions(preds.logits[:2], torch.tensor([0, 1]), keys[:2], metas[:2])
    with pytest.raises(UserError, match="video set/a has samples labelled both"):
        video_predictions(mixed)
    assert video_predictions(Predictions(preds.logits[-1:], preds.labels[-1:], keys[-1:], metas[-1:])) is None


def test_evaluate_reports_video_level_metrics(temporal_run, clip_set, tmp_path):
    from deepfake_dist.evaluation import evaluate

    result = evaluate(EvaluateOptions(checkpoints=[str(temporal_run)], data=[str(clip_set)], out=tmp_path / "eval",
                                      robustness=False, explain=False, batch_size=4))
    row = result["rows"][0]
    assert row["test_images"] == 2 * 3 and row["videos"] == 2 and row["video_aggregate"] == "mean"
    assert row["video_auroc"] is not None and 0 <= row["video_f1"] <= 1
    video = result["results"][0]["video"]
    assert video["metrics"]["0.5"]["samples"] == 2
    assert "video ROC-AUC" in result["table_md"] and "### Video level" in (tmp_path / "eval/report.md").read_text()
    lines = (tmp_path / "eval" / f"videos-{temporal_run.name}.csv").read_text().splitlines()
    assert lines[0].startswith("key,label") and len(lines) == 3


def test_predict_scores_a_video_with_the_clip_model(temporal_run, videos, capsys):
    _, info = load_exported(temporal_run)
    assert info["frames"] == 4 and info["video"]["margin"] == 0.5
    image = videos / "still.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["predict", "--checkpoint", str(temporal_run), str(videos / "real" / "r0.mp4"), str(image), "--json"])
    rows = json.loads(capsys.readouterr().out)
    image.unlink()
    assert code == 1  # the image: a clip model scores videos only
    assert rows[0]["kind"] == "video" and rows[0]["clips"] == 3 and rows[0]["frames"] == 12
    assert 0 <= rows[0]["probability"] <= 1
    assert "scores video clips" in rows[1]["error"]


@pytest.mark.slow
def test_temporal_trains_under_two_gloo_processes(clip_set, tmp_path):
    from test_launch import accelerate_cmd, free_port

    cmd = accelerate_cmd(
        "--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"), "--main_process_port", str(free_port()),
        str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/temporal.yaml"),
        f"data.train=[{clip_set}]", f"output_dir={tmp_path / 'runs'}", "model.backbone=cnn",
        "model.backbone_args={width: 8}", "model.hidden=16", "data.resolution=32", "data.batch_size=2",
        "data.num_workers=0", "train.epochs=1", "train.max_steps=3", "sched.warmup_steps=1", "wandb.mode=disabled")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/temporal/summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["rank_digests"]) == 2 and summary["ranks agree"]
    _, info = load_exported(tmp_path / "runs/temporal")
    assert info["frames"] == 4 and info["model_args"]["backbone"] == "cnn"
