"""Inference benchmark: PyTorch eager vs ONNX Runtime vs int8 on CPU, and the HTTP server.

    python benchmarks/inference.py --checkpoint runs/resnet18 [--threads 1] [--requests 200]
        [--out benchmarks/results/inference.json] [key=value ...]   # overrides of the stored config

For the exported detector it measures, on the CPU:
- latency (median ms) at batch 1 and 32 of fp32 eager PyTorch, ONNX Runtime and int8
  (``deploy.quantize``: static convolutions calibrated on training shards, dynamic Linear), each
  with ``--threads`` intra-op threads, plus their accuracy / ROC-AUC on the test split;
- the server (``deepfake-dist serve`` in a subprocess, eager and ``--onnx``): requests/s and
  p50 / p99 latency at batch 1 for sequential requests, and requests/s with 8 concurrent clients.
It prints a table, says whether the target (int8 or ONNX >= 1.5x faster than eager at batch 1
and 32 within 2 accuracy points) is met, and writes everything with the machine's description
to ``--out`` (JSON). Self-contained: it needs only the package and the model's shards.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.deploy.compress import cpu_latency_ms, score, stored_config, test_sets
from deepfake_dist.deploy.onnx_export import export_onnx
from deepfake_dist.deploy.quantize import example_shape, quantize_int8, quantized_layers
from deepfake_dist.engine.metrics import binary_metrics
from deepfake_dist.models.exported import in_channels, load_exported, resolve
from deepfake_dist.options import ExportOptions


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def accuracy(run_logits, loader, threshold: float) -> dict:
    """Accuracy and ROC-AUC of any ``logits(images)`` callable over a loader."""

    class Wrapped(torch.nn.Module):
        def forward(self, x):
            return run_logits(x)

    scores, labels = score(Wrapped(), loader)
    m = binary_metrics(scores, labels, threshold)
    return {"accuracy": m["accuracy"], "auroc": m.get("auroc"), "test_images": len(labels)}


def test_image_bytes(cfg) -> bytes:
    """One encoded test image straight from a test shard (what a client would upload)."""
    from deepfake_dist.data.manifest import shard_urls

    url = shard_urls(test_sets(cfg)[0], "test")[0]
    with tarfile.open(url) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg")))
        return tar.extractfile(member).read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_figures(checkpoint: Path, onnx: bool, image: bytes, requests: int, threads: int) -> dict:
    """Start ``deepfake-dist serve`` in a subprocess and measure it from this process."""
    import httpx

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "deepfake_dist", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--onnx"] if onnx else []), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        files = {"file": ("face.png", image, "image/png")}
        with httpx.Client(timeout=60) as client:
            for _ in range(5):  # warm-up
                client.post(f"{url}/v1/detect", files=files).raise_for_status()
            times = []
            start = time.perf_counter()
            for _ in range(requests):
                t = time.perf_counter()
                client.post(f"{url}/v1/detect", files=files).raise_for_status()
                times.append((time.perf_counter() - t) * 1000)
            sequential_s = time.perf_counter() - start

        def worker(n):
            with httpx.Client(timeout=60) as c:
                for _ in range(n):
                    c.post(f"{url}/v1/detect", files=files).raise_for_status()

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, [requests // 8] * 8))
        concurrent_s = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"requests": requests, "requests_per_s": requests / sequential_s,
            "p50_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99)),
            "concurrent_clients": 8, "concurrent_requests_per_s": 8 * (requests // 8) / concurrent_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder or model .safetensors of a detector")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every engine (and the server)")
    p.add_argument("--requests", type=int, default=200, help="sequential HTTP requests per server")
    p.add_argument("--calibration-batches", dest="calibration_batches", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/inference.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the stored training config")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, info = load_exported(args.checkpoint)
    cfg = stored_config(info, args.overrides, where=str(resolve(args.checkpoint)[1]))
    channels, threshold = in_channels(info), float(info.get("threshold", 0.5))
    test = eval_loader(test_sets(cfg), "test", EvalOptions.from_data(cfg.data, channels))
    calibration = eval_loader(cfg.data.train, cfg.data.train_split, EvalOptions.from_data(cfg.data, channels))
    batches = [b.image for _, b in zip(range(args.calibration_batches), calibration)]
    qmodel = quantize_int8(model, batches[0], batches)

    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    onnx_meta = export_onnx(ExportOptions(checkpoint=args.checkpoint, onnx=work / "model.onnx", overrides=args.overrides))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(work / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def onnx_logits(x):
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    engines = {"eager fp32": model, "onnxruntime fp32": onnx_logits, "int8 (torch.ao)": qmodel}
    rows = []
    for name, run in engines.items():
        row = {"engine": name,
               "b1_ms": cpu_latency_ms(run, example_shape(info, 1), args.threads, budget_s=3, max_runs=300),
               "b32_ms": cpu_latency_ms(run, example_shape(info, 32), args.threads, budget_s=5, max_runs=50),
               **accuracy(run, test, threshold)}
        row["b32_images_per_s"] = 32_000 / row["b32_ms"]
        rows.append(row)
        print(f"{name}: b1 {row['b1_ms']:.2f} ms, b32 {row['b32_ms']:.2f} ms, acc {row['accuracy']:.4f}", flush=True)
    eager = rows[0]
    for row in rows:
        row["speedup_b1"], row["speedup_b32"] = eager["b1_ms"] / row["b1_ms"], eager["b32_ms"] / row["b32_ms"]
        row["accuracy_drop_points"] = 100 * (eager["accuracy"] - row["accuracy"])
    met = [r["engine"] for r in rows[1:] if min(r["speedup_b1"], r["speedup_b32"]) >= 1.5
           and r["accuracy_drop_points"] <= 2]

    image = test_image_bytes(cfg)
    servers = {"eager": server_figures(Path(args.checkpoint), False, image, args.requests, args.threads),
               "onnx": server_figures(work / "model.onnx", True, image, args.requests, args.threads)}

    report = {"checkpoint": str(args.checkpoint), "model": info["model"], "model_args": info.get("model_args"),
              "input": list(example_shape(info, 1)[1:]), "threads": args.threads, "engines": rows,
              "int8_layers": quantized_layers(qmodel), "onnx_parity_max_abs_diff": onnx_meta["parity"]["max_abs_diff"],
              "server": servers, "target": {"rule": ">= 1.5x eager at b1 and b32, <= 2 points accuracy drop",
                                            "met_by": met}, "machine": machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print_table(report)
    print(f"written {out}")
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} {report['input']} on CPU, {report['threads']} thread(s)")
    for col in ("engine", "b1 ms", "b32 ms", "b32 img/s", "speedup b1/b32", "acc", "AUC"):
        table.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True)
    for r in report["engines"]:
        table.add_row(r["engine"], f"{r['b1_ms']:.2f}", f"{r['b32_ms']:.1f}", f"{r['b32_images_per_s']:.0f}",
                      f"{r['speedup_b1']:.1f}x / {r['speedup_b32']:.1f}x", f"{100 * r['accuracy']:.1f}%",
                      f"{r['auroc']:.4f}" if r["auroc"] is not None else "-")
    server = Table(title="HTTP server, batch 1 (POST /v1/detect)")
    for col in ("backend", "req/s", "p50 ms", "p99 ms", "req/s, 8 clients"):
        server.add_column(col, justify="left" if col == "backend" else "right")
    for name, s in report["server"].items():
        server.add_row(name, f"{s['requests_per_s']:.1f}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}",
                       f"{s['concurrent_requests_per_s']:.1f}")
    console = Console()
    console.print(table)
    console.print(server)
    met = report["target"]["met_by"]
    console.print(f"target ({report['target']['rule']}): " + (f"met by {', '.join(met)}" if met else "NOT met"))


if __name__ == "__main__":
    sys.exit(main())
