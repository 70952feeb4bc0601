"""Every benchmark runs end to end at tiny sizes through ``deepfake-dist bench NAME`` and writes
its JSON (machine, arguments, positive rates), so the suite cannot rot between the runs that
produce BENCHMARKS.md. The figures themselves are not tested here: they need a quiet machine."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from deepfake_dist.cli import main


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_data")  # the generated face sets, shared by the tests


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(name: str, tmp_path, bench_data, *args: str) -> dict:
    out = tmp_path / "results"
    assert main(["bench", name, "--out", str(out), "--data", str(bench_data), "--repeats", "1", *args]) == 0
    (path,) = out.glob(f"{name}-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == name and record["machine"]["torch"] == torch.__version__
    assert record["machine"]["logical_cores"] >= 1 and record["machine"]["cpu"]
    return record["results"]


def test_loader(tmp_path, bench_data):
    results = _run("loader", tmp_path, bench_data, "--samples", "64", "--memory-samples", "64", "--workers", "0",
                   "--memory-workers", "0", "--epochs", "1", "--batch-size", "8")
    assert results["limit"]["1"]["per_s"] > 0
    row = results["workers"]["0"]
    assert row["webdataset_per_s"] > 0 and row["imagefolder_per_s"] > 0 and row["webdataset_vs_limit"] > 0
    memory = results["memory"]["sets"]["64"]  # streamed in a fresh process
    assert memory["set_samples"] == memory["streamed"] == 64 and memory["peak_rss_mib"] > memory["peak_uss_mib"] > 0


def test_trainer(tmp_path, bench_data):
    results = _run("trainer", tmp_path, bench_data, "--models", "cnn", "dcgan", "--steps", "1", "--warmup", "1",
                   "--batch-size", "4", "--resolution", "32")
    for model in ("cnn", "dcgan"):
        row = results["models"][model]
        assert row["batch_size"] == 4 and row["platform_images_per_s"] > 0 and row["bare_images_per_s"] > 0


def test_ddp_two_gloo_processes(tmp_path, bench_data):
    results = _run("ddp", tmp_path, bench_data, "--processes", "2", "--steps", "4", "--warmup", "2",
                   "--batch-size", "4", "--samples", "64")
    row = results["processes"]["2"]
    assert row["images_per_s"] > 0 and row["runs"][0]["steps"] == [2, 4]


def test_video_prepare_on_a_tiny_ffpp_replica(tmp_path, bench_data):
    pytest.importorskip("cv2", reason="videos need the video extra (opencv-python-headless<5)")
    results = _run("video_prepare", tmp_path, bench_data, "--pairs", "1", "0", "0", "--size", "160x120",
                   "--video-frames", "8", "--frames", "4", "--workers", "1", "--stage-videos", "2")
    assert results["videos"] == 10 and results["workers"]["1"]["samples"] == 10 * 4
    assert results["workers"]["1"]["videos_per_s"] > 0 and results["workers"]["1"]["shards"] == 2
    assert sum(results["stages"]["share"].values()) == pytest.approx(1.0) and results["stages"]["videos"] == 2


def test_av_on_the_replica(tmp_path, bench_data):
    pytest.importorskip("av", reason="sound needs the video extra (av)")
    results = _run("av", tmp_path, bench_data, "--sets", "replica", "--epochs", "1", "--max-steps", "1", "--width", "4")
    assert results["prepare"]["with audio"]["videos"] == 16 and results["prepare"]["with audio"]["cost_ratio"] > 0
    assert set(results["replica"]) == {"audio", "frames", "av"}
    assert all(len(row["categories"]) == 4 and row["modalities"]["audio"]["samples"] == 8
               for row in results["replica"].values())


def test_gpu_skips_without_cuda_and_runs_on_cpu_when_asked(tmp_path, bench_data, capsys):
    if not torch.cuda.is_available():
        assert main(["bench", "gpu", "--out", str(tmp_path / "none")]) == 0
        assert "no CUDA device: skipped" in capsys.readouterr().out and not (tmp_path / "none").exists()
    results = _run("gpu", tmp_path, bench_data, "--device", "cpu", "--models", "cnn", "dcgan", "--resolution", "32",
                   "--gan-resolution", "32", "--precisions", "fp32", "fp32-ieee", "--layouts", "contiguous", "--compile-modes",
                   "--cudnn-benchmark", "off",
                   "--batch-size", "2", "4", "--gan-batch-size", "2", "--steps", "1", "--windows", "1", "--warmup", "0",
                   "--loader-workers", "0", "--loader-batch-size", "8", "--loader-samples", "64", "--loader-epochs", "1",
                   "--loader-augment", "on", "off", "--loader-nice", "0", "5")
    assert {(c["model"], c["batch_size"], c["precision"]) for c in results["configs"]} == {
        (m, b, p) for m, b in (("cnn", 2), ("cnn", 4), ("dcgan", 2)) for p in ("fp32", "fp32-ieee")}
    assert all(c["images_per_s"] > 0 and "error" not in c for c in results["configs"])
    assert sorted(results["flops_per_step"]) == ["cnn@2", "cnn@4", "dcgan@2"]
    assert results["flops_per_step"]["cnn@4"] == 2 * results["flops_per_step"]["cnn@2"] > 0
    assert [(lm["augment"], lm["worker_nice"]) for lm in results["loader_vs_model"]] == [
        (True, 0), (True, 5), (False, 0), (False, 5)]
    assert all(lm["data_wait_frac"] >= 0 for lm in results["loader_vs_model"])
    compared = results["platform_vs_bare"][0]
    assert compared["batch_size"] == 2 and compared["platform_vs_bare"] > 0 and compared["platform_vs_bare_fused"] > 0
    assert compared["platform_host_waits"] is None  # counted on CUDA only


def test_gpu_grid_puts_each_compile_mode_after_the_eager_runs_fp32_next_to_bf16():
    from benchmarks.gpu import grid, speedups

    args = argparse.Namespace(models=["resnet18", "dcgan"], precisions=["fp32", "bf16"], layouts=["channels_last"],
                              batch_size=[128], gan_batch_size=256, cudnn_benchmark=["off"],
                              compile_modes=["default", "max-autotune-no-cudagraphs"])
    configs = grid(args)
    assert [(c["compile"], c["model"], c["precision"]) for c in configs] == [
        (None, "resnet18", "fp32"), (None, "resnet18", "bf16"), (None, "dcgan", "fp32"), (None, "dcgan", "bf16"),
        *[(mode, model, precision) for mode in args.compile_modes for model in args.models
          for precision in ("bf16", "fp32")]]
    rated = [{**c, "images_per_s": 3.0 if c["precision"] == "bf16" else 2.0} for c in configs[:2] + configs[4:6]]
    assert [(s["compile"], s["ratio"]) for s in speedups(rated, "bf16", "fp32")] == [(None, 1.5), ("default", 1.5)]


def test_unknown_benchmark_is_one_line(capsys):
    assert main(["bench", "lodaer"]) == 2
    assert "did you mean 'loader'" in capsys.readouterr().err


def test_scale(tmp_path, bench_data):
    results = _run("scale", tmp_path, bench_data, "--samples", "400", "--scaling-samples", "0", "--ranks", "1",
                   "--sizes", "200", "--rate-samples", "300", "--shard-size", "50", "--loader-workers", "1",
                   "--batch-size", "8")
    assert results["prepare"]["samples"] == 400 and results["prepare"]["samples_per_s"] > 0
    assert results["verify"]["problems"] == 0 and results["manifest_bytes"] > 0
    assert [row["set_samples"] for row in results["stream"]] == [200]  # the set's first 200, linked
    assert results["rate"]["200"]["runs"][0]["samples"] >= 300  # two epochs of it
    assert all(row["samples_per_s"] > 0 and len(row["worker_peak_rss_mib"]) == 1 for row in results["stream"])


def test_resume_on_the_scale_set(tmp_path, bench_data):
    results = _run("resume", tmp_path, bench_data, "--samples", "400", "--workers", "1", "--batch-size", "8")
    assert results["same_batch"] and results["resume_batch"] == int(0.9 * results["batches_per_epoch"])
    assert results["replay_s"] > 0 and results["skip_s"] > 0


def test_projection(tmp_path, bench_data):
    pytest.importorskip("timm")  # efficientnet_b4
    results = _run("projection", tmp_path, bench_data, "--images-per-s", "resnet18=1000", "hybrid=300",
                   "efficientnet_b4=200", "--cpu-images-per-s", "100")
    assert results["models"]["resnet18"]["parameters"] > results["models"]["hybrid"]["parameters"] > 0
    rows = [r for r in results["rows"] if r["model"] == "resnet18"]
    assert [r["gpus"] for r in rows] == [8, 64, 256, 64, 256]
    assert all(0 < r["efficiency_no_overlap"] <= r["efficiency_overlap"] <= 1 for r in results["rows"])
    assert rows[2]["efficiency_no_overlap"] < rows[1]["efficiency_no_overlap"] < rows[0]["efficiency_no_overlap"]
