"""Fault 5, the output disk full, played by a file-size limit (``RLIMIT_FSIZE``; Python ignores
SIGXFSZ, so a write past it fails with EFBIG as on a full disk). Sharding, checkpointing and the export stop
with one line naming the folder, leave nothing half-written that looks complete, and keep the
previous checkpoint."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest
from inject import SMOKE

from deepfake_dist.atomic import atomic_path, write_text_atomic
from deepfake_dist.config import load_config
from deepfake_dist.train.checkpoint import checkpoint_dir, checkpoint_problem, complete_checkpoints
from deepfake_dist.train.loop import train

LIMIT = 48 * 1024  # a shard (~60 KiB) or a checkpoint's model file (~100 KiB) does not fit


def _run_limited(*args: str, limit: int = LIMIT) -> subprocess.CompletedProcess:
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deepfake_dist", *args], preexec_fn=set_limit, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_sharding_on_a_full_disk(tmp_path):
    from datasets import write_face_folder

    faces = write_face_folder(tmp_path / "faces", 24, 24)
    out = tmp_path / "shards" / "faces"
    proc = _run_limited("prepare", "--source", f"folder:{faces}", "--out", str(out), "--resolution", "32",
                        "--shard-size", "16")
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write shard set {out}: disk full or file too large in {out}" in errors[0]
    assert "nothing was kept" in errors[0]
    assert list(out.iterdir()) == []  # no manifest.json, no shard, no .tmp


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(overrides):
    args = overrides + ["checkpoint.every_steps=2", "train.max_steps=2"]
    run_dir = load_config(SMOKE, args).run_dir
    train(load_config(SMOKE, args))
    folder = checkpoint_dir(run_dir)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2"]

    # the file-size limit also caps the loader's shared-memory files, which a full disk does not
    # (/dev/shm is memory): keep each hand-off to one 32 KiB batch, under the limit
    proc = _run_limited("train", "--config", str(SMOKE), *args, "train.max_steps=4", "data.transfer_mib=0")
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write checkpoint {folder / '.tmp-step-4'}: disk full or file too large in {folder}" in errors[0]
    assert f"the previous checkpoint {folder / 'step-2'} is intact" in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]  # no step-4, no .tmp-step-4
    assert checkpoint_problem(folder / "step-2") is None


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_leaves_no_partial_file(overrides):
    """No checkpoint comes before the first epoch's export here, so the export meets the limit."""
    args = overrides + ["checkpoint.every_steps=null", "train.epochs=1", "data.transfer_mib=0"]
    run_dir = load_config(SMOKE, args).run_dir
    proc = _run_limited("train", "--config", str(SMOKE), *args)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    exported = run_dir / "model.safetensors"
    assert f"cannot write the exported model {exported}: disk full or file too large in {run_dir}" in errors[0]
    assert errors[0].endswith("any earlier export are intact; free space and rerun to resume")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl"]  # no model, no .tmp


@pytest.mark.slow
def test_a_sample_grid_on_a_full_disk_is_one_line(tmp_path, real_face_shards):
    """A GAN's first grid (~5 KiB) meets a 4 KiB limit; no workers, so no shared-memory files."""
    from gen_setup import CONFIGS, tiny_gan

    samples = tmp_path / "runs" / "gan" / "samples"
    proc = _run_limited("train", "--config", str(CONFIGS / "dcgan.yaml"),
                        *tiny_gan(real_face_shards, tmp_path / "runs", "gan"), limit=4 * 1024)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write the sample grid {samples / 'step-000002.png'}: disk full" in errors[0]
    assert list(samples.iterdir()) == []  # no half-written grid, no .tmp


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["shards", "png"])
def test_generating_fakes_on_a_full_disk_is_one_line(gan_run, tmp_path, fmt):
    """A 64-byte limit: less than a tar header or any PNG of a face."""
    out = tmp_path / "fakes"
    where = ["--out", str(out)] if fmt == "shards" else ["--format", "png", "--output_dir", str(out)]
    proc = _run_limited("generate", "--checkpoint", str(gan_run), "--num-images", "8", *where, limit=64)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    what = f"shard set {out}" if fmt == "shards" else f"the image {out / 'tinygan-000000.png'}"
    assert f"cannot write {what}: disk full or file too large in {out}" in errors[0]
    assert list(out.iterdir()) == []  # no .tmp, no half-written shard or image


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export", "compress", "explain"])
def test_what_a_command_writes_on_a_full_disk_is_one_line(command, deploy_run, deploy_shards, tmp_path):
    """A 2 KiB limit on one process without loader workers (their shared-memory files would meet it first)."""
    run = shutil.copytree(deploy_run, tmp_path / "run")  # evaluate stores a temperature in its model.json
    shards, images = deploy_shards
    out = tmp_path / "out"
    args, what = {
        "evaluate": (["--data", str(shards), "--out", str(out), "--workers", "0", "--no-robustness"],
                     f"the evaluation's results in {out}"),
        "export": (["--onnx", str(out / "model.onnx")], f"the ONNX model {out / 'model.onnx'}"),
        "compress": (["--out", str(out), "--quantize", "int8"], f"the compressed models in {out}"),
        "explain": (["--out", str(out), str(next(p for p in images.rglob("*") if p.is_file()))], "the overlay "),
    }[command]
    proc = _run_limited(command, "--checkpoint", str(run), *args, limit=2048)
    assert proc.returncode == 2, proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {what}" in errors[0] and "disk full or file too large" in errors[0], errors[0]
    assert errors[0].endswith("no file there is half-written; free space and rerun")
    assert out.is_dir() and not list(out.rglob(".*.tmp*"))  # what failed was removed


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """Every file the project publishes goes through ``atomic_path``."""
    target = tmp_path / "model.safetensors"
    write_text_atomic(target, "old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".safetensors" and tmp != target
            tmp.write_text("half of the new")
            raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and target.read_text() == "old"
    write_text_atomic(target, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and target.read_text() == "new"
