"""The detectors that hear, end to end on the FakeAVCeleb replica (``av_data``): the log-mel and
the ``audio`` and ``av`` models, training with three heads (in-process, and on two gloo processes
with a bit-exact resume), evaluation per modality and per category with Grad-CAM over frames and
spectrograms, ``predict`` on a video with its sound, the server's video uploads and limits, and
the ONNX export of the audio encoder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from deepfake_dist.cli import main
from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.models import create_model
from deepfake_dist.models.audio import LogMel, mel_filterbank
from deepfake_dist.models.av import synchrony
from deepfake_dist.options import EvaluateOptions, ExportOptions, ServeOptions
from deepfake_dist.train.loop import train

pytest.importorskip("av", reason="sound needs the video extra (av)")
from av_data import person_video  # noqa: E402 - after the skip

ROOT = Path(__file__).resolve().parent.parent
TINY_AV = ["model.frames=cnn", "model.frames_args={width: 8}", "model.dim=16", "model.audio_width=8", "model.heads=2",
           "model.fusion=attention", "model.sync=true"]
SMALL = ["wandb.mode=disabled", "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "sched.warmup_steps=1"]


def _train(config: str, shards: Path, runs: Path, *extra: str) -> Path:
    overrides = [f"data.train=[{shards}]", f"output_dir={runs}", *SMALL, *extra]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    train(cfg)
    return cfg.run_dir


@pytest.fixture(scope="module")
def av_run(av_shards, tmp_path_factory) -> Path:
    return _train("av", av_shards, tmp_path_factory.mktemp("runs"), *TINY_AV, "train.epochs=3", "optim.lr=0.003")


@pytest.fixture(scope="module")
def audio_run(av_shards, tmp_path_factory) -> Path:
    return _train("audio", av_shards, tmp_path_factory.mktemp("runs"), "model.width=8", "train.epochs=3")


# ------------------------------------------------------------------------------------- models


def test_the_log_mel_is_torch_stfts_power_through_the_mel_filterbank():
    wave = torch.randn(2, 8000) * 0.1
    power = torch.stft(wave, 400, 160, window=torch.hann_window(400), center=True, pad_mode="reflect",
                       return_complex=True).abs().square()
    expected = torch.log(mel_filterbank(201, 64).T @ power + 1e-6)
    torch.testing.assert_close(LogMel(64)(wave)[:, 0], expected, atol=2e-4, rtol=1e-4)
    bank = mel_filterbank(201, 64)
    assert bank.shape == (201, 64) and (bank.sum(0) > 0.3).all()  # no empty filter


def test_av_gives_three_logits_for_every_frame_model_and_fusion():
    clip, wave = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 11200)
    for frames, args in (("cnn", {"width": 8}), ("temporal", {"backbone": "cnn", "backbone_args": {"width": 8}, "hidden": 8})):
        for fusion in ("concat", "attention"):
            model = create_model("av", frames=frames, frames_args=args, fusion=fusion, dim=16, audio_width=8, heads=2,
                                 sync=fusion == "attention").eval()
            with torch.no_grad():
                assert model(clip, wave).shape == (2, 3)
    with pytest.raises(UserError, match="av frames must be an image detector or temporal, not 'audio'"):
        create_model("av", frames="audio")
    with pytest.raises(UserError, match="unknown av fusion 'sum'"):
        create_model("av", fusion="sum")


def test_synchrony_follows_the_mouth_with_the_loudness():
    t, step = 6, 1000
    loudness = torch.tensor([0.1, 0.8, 0.2, 0.9, 0.1, 0.7])
    wave = (loudness[:, None] * torch.sin(torch.arange(step) * 0.3)).reshape(1, -1)
    clip = torch.zeros(1, t, 3, 32, 32)
    clip[0, :, :, 20:28, 8:24] = loudness[:, None, None, None]  # the mouth region opens with the sound
    in_step = synchrony(clip, wave).item()
    dubbed = synchrony(clip, wave.reshape(t, step).flip(0).reshape(1, -1)).item()
    assert in_step > 0.95 and dubbed < in_step - 0.5


def test_a_model_that_hears_needs_sets_with_sound(av_shards, tmp_path, face_shards):
    with pytest.raises(UserError, match="model.name audio scores a clip's sound, but .* holds none"):
        load_config(ROOT / "configs/audio.yaml", [f"data.train=[{av_shards}]", f"data.val=[{face_shards}]",
                                                  f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="'train.monitor' is val/auroc_video, the ROC-AUC of a video head, which "
                                        "model.name audio does not have"):
        load_config(ROOT / "configs/audio.yaml", [f"data.train=[{av_shards}]", "train.monitor=val/auroc_video",
                                                  f"output_dir={tmp_path}"])


# ---------------------------------------------------------------------------------- training


def test_av_trains_its_three_heads_and_audio_learns_the_sound(av_run, audio_run):
    records = [json.loads(line) for line in (av_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/auroc_audio" in r]
    assert val and {"val/auroc", "val/auroc_video", "val/auroc_audio"} <= set(val[-1])
    info = json.loads((av_run / "model.json").read_text())
    assert info["model"] == "av" and info["frames"] == 4 and info["audio"]["samples"] == 11200
    audio_val = [json.loads(line) for line in (audio_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("val/auroc", 0) for r in audio_val) > 0.9  # the cloned voice is easy to hear


def test_bf16_autocast_trains_av(av_shards, tmp_path):
    run = _train("av", av_shards, tmp_path, *TINY_AV, "train.max_steps=2", "train.mixed_precision=bf16", "name=bf16")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["nonfinite steps"] == 0


@pytest.mark.slow
def test_av_trains_on_two_gloo_processes_and_resumes_bit_exactly(av_shards, tmp_path):
    from safetensors.torch import load_file
    from test_launch import accelerate_cmd, free_port

    def launch(name: str, *extra: str) -> Path:
        cmd = accelerate_cmd(
            "--config_file", str(ROOT / "configs/accelerate/cpu_gloo.yaml"), "--main_process_port", str(free_port()),
            str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/av.yaml"), f"data.train=[{av_shards}]",
            f"output_dir={tmp_path / 'runs'}", f"name={name}", *SMALL, *TINY_AV, "data.batch_size=2", "train.epochs=2",
            "checkpoint.keep_last=3", *extra)
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=400, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return tmp_path / "runs" / name

    whole = launch("whole")
    summary = json.loads((whole / "summary.json").read_text())
    assert len(summary["rank_digests"]) == 2 and summary["ranks agree"]
    steps = sorted(int(p.name.split("-")[1]) for p in (whole / "checkpoints").glob("step-*"))
    resumed = launch("resumed", f"checkpoint.resume={whole / 'checkpoints' / f'step-{steps[0]}'}")
    a = load_file(str(whole / "checkpoints" / f"step-{steps[-1]}" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / f"step-{steps[-1]}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- downstream


def test_evaluation_reports_each_modality_and_category(av_run, audio_run, av_shards, tmp_path):
    from deepfake_dist.evaluation import evaluate

    result = evaluate(EvaluateOptions(checkpoints=[str(av_run), str(audio_run)], data=[str(av_shards)],
                                      out=tmp_path / "eval", robustness=False, batch_size=8, workers=0))
    av, audio = result["results"]
    assert [m["label"] for m in av["modalities"]] == ["overall", "video", "audio"]
    assert [m["head"] for m in av["modalities"]] == ["overall", "video", "audio"]
    assert {m["head"] for m in audio["modalities"]} == {"the model's logit"}
    # the test split is one identity's 4 videos of 2 clips each
    assert [(m["samples"], m["fakes"]) for m in av["modalities"]] == [(8, 6), (8, 4), (8, 4)]
    assert next(m for m in audio["modalities"] if m["label"] == "audio")["auroc"] > 0.9
    categories = {c["category"]: c for c in av["categories"]}
    assert len(categories) == 4 and categories["RealVideo-RealAudio"]["label"] == "real"
    assert all(c["samples"] == 2 and "auroc_vs_real" in c for n, c in categories.items() if n != "RealVideo-RealAudio")
    row = result["rows"][0]
    assert row["auroc_audio_stream"] is not None and row["auroc_video_stream"] is not None
    assert "fake-sound ROC-AUC" in result["table_md"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "### Per modality" in report and "### Per category" in report
    for figure in ("gradcam-av.png", "spectrogram-av.png", "gradcam-audio.png"):
        assert (tmp_path / "eval" / figure).stat().st_size > 1000


def test_predict_scores_a_video_with_its_sound(av_run, audio_run, av_replica, tmp_path, capsys):
    video = next(av_replica.root.glob("RealVideo-FakeAudio/*/*/*/*.mp4"))
    silent = person_video(tmp_path / "silent.mp4", 1, 16, 10.0, sound=False)
    assert main(["predict", "--checkpoint", str(av_run), str(video), str(silent), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["clips"] == 2 and rows[0]["clips_without_sound"] == 0 and set(rows[0]["heads"]) == {
        "overall", "video", "audio"}
    assert rows[1]["clips_without_sound"] == 2 and 0 <= rows[1]["probability"] <= 1  # frames alone still scored
    assert main(["predict", "--checkpoint", str(audio_run), str(video), str(silent), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert 0 <= rows[0]["probability"] <= 1 and "no clip has sound" in rows[1]["error"]


def test_the_server_scores_a_video_and_refuses_a_too_long_one(av_run, av_replica, tmp_path):
    from deploy_setup import live_server

    from deepfake_dist.serve.app import create_app

    video = next(av_replica.root.glob("FakeVideo-FakeAudio/*/*/*/*.mp4")).read_bytes()
    long = person_video(tmp_path / "long.mp4", 1, 40, 10.0).read_bytes()  # 4 s
    opts = ServeOptions(checkpoint=str(av_run), max_video_seconds=2.5, max_video_bytes=2_000_000)
    with live_server(create_app(opts)) as url:
        def post(name: str, data: bytes, path: str = "/v1/detect") -> httpx.Response:
            return httpx.post(f"{url}{path}", files={"file": (name, data, "video/mp4")}, timeout=120)

        ok = post("clip.mp4", video)
        assert ok.status_code == 200, ok.text
        body = ok.json()  # the longest stream counts: its sound runs 0.2 s past its 16 frames at 10 fps
        assert 0 <= body["fake_probability"] <= 1 and body["clips"] == 2 and set(body["heads"]) == {
            "overall", "video", "audio"} and body["seconds"] == pytest.approx(1.8, abs=0.15)
        too_long = post("long.mp4", long)
        assert too_long.status_code == 413 and too_long.json()["code"] == "too_large"
        assert "over the limit of 2.5 s" in too_long.json()["detail"]
        assert post("x.mp4", b"\x00" * 3_000_000).status_code == 413  # over the bytes, before the body is read
        not_video = post("notes.mp4", b"just some text, not a container")
        assert not_video.status_code == 415 and not_video.json()["code"] == "unsupported_format"
        card = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert card["accepts"] == "video" and card["limits"]["max_video_seconds"] == 2.5


def test_the_audio_encoder_exports_to_onnx_and_scores_as_pytorch(audio_run, av_replica, tmp_path):
    from deepfake_dist.deploy.onnx_export import export_onnx
    from deepfake_dist.deploy.scorer import load_scorer

    meta = export_onnx(ExportOptions(checkpoint=str(audio_run), onnx=str(audio_run / "model.onnx")))
    assert meta["input"] == "audio" and meta["input_shape"] == ["batch", 11200] and meta["parity"]["max_abs_diff"] <= 1e-4
    video = next(av_replica.root.glob("RealVideo-FakeAudio/*/*/*/*.mp4"))
    eager, onnx = load_scorer(audio_run).score_video(video), load_scorer(audio_run, onnx=True).score_video(video)
    assert onnx["probability"] == pytest.approx(eager["probability"], abs=1e-5)
    with pytest.raises(UserError, match="--images .* takes audio"):
        export_onnx(ExportOptions(checkpoint=str(audio_run), onnx=str(tmp_path / "x.onnx"), images=str(tmp_path)))
