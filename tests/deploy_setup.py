"""Data, a trained detector and a live server for the deploy tests (compress, ONNX, distill, serve).

The shard set has 100 real LFW faces and 100 toy fakes split 0.5 / 0.1 / 0.4, so the test split
(80 images) is big enough for "int8 within 2 points of fp32" to mean something (one image is
1.25 points). The detector is a small CNN trained for a few epochs (~10 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from datasets import write_face_folder
from scale_setup import free_port

ROOT = Path(__file__).resolve().parent.parent


def make_deploy_shards(root: Path) -> tuple[Path, Path]:
    """(shard set, image folder with real/ and fake/)."""
    from deepfake_dist.data.prepare import prepare
    from deepfake_dist.options import PrepareOptions

    folder = write_face_folder(root / "faces", 100, 100)
    out = root / "shards" / "faces"
    prepare(PrepareOptions(source=f"folder:{folder}", out=out, resolution=32, format="png", shard_size=20, split=(0.5, 0.1, 0.4)))
    return out, folder


def detector_config(shards: Path, runs: Path, name: str, *extra: str):
    from deepfake_dist.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.train=[{shards}]", f"output_dir={runs}", "wandb.mode=disabled", f"name={name}",
        "data.num_workers=0", "data.persistent_workers=false", "data.batch_size=16", "checkpoint.every_steps=null",
        *extra])


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than two that spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_detector(shards: Path, runs: Path) -> Path:
    from deepfake_dist.train.loop import train

    with one_thread():
        train(detector_config(shards, runs, "cnn8", "model.width=8", "train.epochs=6", "optim.lr=0.01"))
    return runs / "cnn8"


@contextlib.contextmanager
def live_server(app):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
