"""``deepfake-dist predict`` scores files, folders and videos (one row per file) with the same
preprocessing as the shards, and ``explain`` writes an overlay per image."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfake_dist.cli import main
from deepfake_dist.models.exported import load_info


def _predict(capsys, *args) -> tuple[int, list[dict]]:
    code = main(["predict", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_files_and_folders_give_one_row_per_file(detectors, eval_sets, capsys):
    faces = Path(eval_sets["faces_folder"])
    files = [faces / "real" / "face_000.png", faces / "fake" / "face_001.png"]
    code, rows = _predict(capsys, "--checkpoint", detectors[0], *files, faces / "fake")
    assert code == 0
    folder = sorted((faces / "fake").glob("*.png"))
    assert [r["path"] for r in rows] == [str(p) for p in files + folder]
    for r in rows:
        assert r["kind"] == "image" and 0 <= r["probability"] <= 1
        assert r["verdict"] == ("fake" if r["probability"] > r["threshold"] else "real")
    assert np.mean([r["verdict"] == "fake" for r in rows[2:]]) > 0.8  # a trained detector sees the fakes


def test_predict_preprocesses_files_like_the_shards(evaluated, eval_sets, capsys):
    """A source image scored by predict gets the logit its shard copy got in evaluate."""
    run = evaluated["rows"][0]
    with open(evaluated["out"] / f"predictions-{run['run']}.csv") as f:
        shard = {r["key"]: float(r["logit"]) for r in csv.DictReader(f) if r["key"].startswith("faces/")}
    faces = Path(eval_sets["faces_folder"])
    files = [faces / label / f"{name}.png" for label, name in (k.split("/", 1)[1].split("-", 1) for k in shard)]
    code, rows = _predict(capsys, "--checkpoint", run["checkpoint"], *files)
    temperature = load_info(run["checkpoint"])["temperature"]
    assert code == 0 and len(rows) == len(shard) == 12 and temperature != 1.0
    for row, logit in zip(rows, shard.values()):
        p = row["probability"]
        assert math.log(p / (1 - p)) * temperature == pytest.approx(logit, abs=1e-4)


def test_a_broken_file_gets_an_error_row_and_the_rest_are_scored(detectors, eval_sets, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = Path(eval_sets["faces_folder"]) / "real" / "face_002.png"
    code, rows = _predict(capsys, "--checkpoint", detectors[0], broken, good)
    assert code == 1
    assert rows[0]["probability"] is None and rows[0]["error"] and rows[0]["verdict"] is None
    assert rows[1]["probability"] is not None and "error" not in rows[1]
    assert main(["predict", "--checkpoint", detectors[0], str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_video_is_frame_sampled_and_face_cropped(detectors, tmp_path, capsys):
    cv2 = pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless)")
    from skimage.data import astronaut

    frame = cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (256, 256))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (256, 256))
    for i in range(10):
        writer.write(np.roll(frame, 2 * i, axis=1))
    writer.release()
    blank = tmp_path / "blank.avi"
    writer = cv2.VideoWriter(str(blank), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for _ in range(4):
        writer.write(np.zeros((64, 64, 3), np.uint8))
    writer.release()
    code, rows = _predict(capsys, "--checkpoint", detectors[0], "--frames", "4", video, blank)
    assert code == 1  # the blank video has no face
    assert rows[0]["kind"] == "video" and rows[0]["frames"] == 4 and rows[0]["frames_without_face"] == 0
    assert 0 <= rows[0]["probability"] <= 1
    assert rows[1]["probability"] is None and "no face" in rows[1]["error"]


def test_explain_writes_an_overlay_per_image(detectors, eval_sets, tmp_path, capsys):
    faces = Path(eval_sets["faces_folder"])
    images = [faces / "real" / "face_000.png", faces / "fake" / "face_000.png"]
    out = tmp_path / "explained"
    assert main(["explain", "--checkpoint", detectors[0], *map(str, images), "--out", str(out)]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 2  # same stem in two folders: both kept
    pixels = []
    for path in written:
        with Image.open(path) as img:
            assert img.size == (256, 256) and img.mode == "RGB"
            pixels.append(np.asarray(img))
    assert np.abs(pixels[0].astype(int) - pixels[1]).mean() > 1
    assert capsys.readouterr().out.count("p(fake)") == 2
