"""A million samples: a shard set of small synthetic faces (32 px, drawn by this benchmark) made
by the platform's shard writer over workers x 2 ranks (``accelerate launch``, two gloo
processes), then streamed by the training loader.

* prepare: samples/s of the 1 000 000-sample set (2 ranks; a set an earlier run made is kept
  unless ``--fresh``), and of a smaller set made by 1 and by 2 processes taking turns for
  ``--repeats`` rounds (the scaling: the median of the per-round ratios);
* the loader (``train_loader``, one rank and its workers, each run in a fresh process) over the
  first 10 000, 100 000 and 1 000 000 samples of the set: samples/s over the same
  ``--rate-samples`` from each (the sizes taking turns, ``--repeats`` rounds), then one whole
  epoch of each with the peak RSS of the process and of each worker (the kernel's high-water
  mark, ``VmHWM``);
* the manifest's size and the time ``shards verify`` takes over the whole set.

    deepfake-dist bench scale [--samples 1000000] [--scaling-samples 20000] [--sizes 10000 100000 1000000]
                              [--rate-samples 100000] [--ranks 2] [--workers 1] [--loader-workers 2] [--fresh]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import REPO, console, interleaved, machine, parser, print_table, write_result
from deepfake_dist.data.common import Item
from deepfake_dist.data.manifest import MANIFEST_NAME, load_manifest, manifest_id, verify

SIZE = 32
GLOO = REPO / "configs" / "accelerate" / "cpu_gloo.yaml"


def synthetic_face(index: int) -> Image.Image:
    """A 32-px face drawn from ``index`` alone: a skin-toned oval on a plain background, two eyes
    and a mouth, each placed, sized and coloured at random, with sensor-like noise; odd indices
    (the fakes) carry a faint checkerboard, an upsampling trace."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    cy, cx = 0.5 + rng.normal(0, 0.03, 2)
    image = np.broadcast_to(rng.uniform(0, 255, 3), (SIZE, SIZE, 3)).copy()
    oval = ((yy - cy) / rng.uniform(0.32, 0.42)) ** 2 + ((xx - cx) / rng.uniform(0.25, 0.33)) ** 2 < 1
    image[oval] = [rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)]
    eye = rng.uniform(0.03, 0.05)
    for side in (-1, 1):
        image[(yy - cy + 0.1) ** 2 + (xx - cx - side * 0.12) ** 2 < eye**2] = rng.uniform(0, 60, 3)
    image[((yy - cy - 0.17) / 0.03) ** 2 + ((xx - cx) / rng.uniform(0.08, 0.14)) ** 2 < 1] = [rng.uniform(120, 200), 40, 50]
    image += rng.normal(0, 6, image.shape)
    if index % 2:
        image += (5.0 * (((np.arange(SIZE)[:, None] + np.arange(SIZE)) % 2) * 2 - 1))[..., None]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def synthetic_items(samples: int) -> list[Item]:
    return [Item(f"face-{i:07d}", None, i % 2, partial(synthetic_face, i)) for i in range(samples)]


def write_set(out: Path, samples: int, workers: int, shard_size: int) -> dict:
    """Every rank: ``samples`` synthetic faces, all in the train split, written into ``out``;
    returns the manifest, and (the main process of several) prints the seconds the writing took,
    from the barrier where every rank has its plan."""
    from deepfake_dist.data.shard_writer import Encoding, ShardSetWriter, created_info, plan_shards
    from deepfake_dist.engine.distributed import distributed_state

    state = distributed_state()
    writer = ShardSetWriter(out, True, state, workers)
    jobs = writer.jobs(plan_shards(synthetic_items(samples), (1.0, 0.0, 0.0), 0, shard_size),
                       Encoding("RGB", SIZE, "png"))
    state.wait_for_everyone()
    start = time.perf_counter()
    writer.write(jobs)
    fields = None
    if state.is_main_process:
        fields = {"name": writer.name, "source": f"synthetic:{samples}", "resolution": SIZE, "format": "png",
                  "channels": 3, "mode": "RGB", "frames": None, "preprocessing": {"drawn": "benchmarks/scale.py"},
                  "created": created_info("deepfake-dist bench scale", workers, state.num_processes)}
    manifest = writer.finish(fields, [], samples)
    if state.is_main_process and state.num_processes > 1:  # for the launching process
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return manifest


def prepare(out: Path, samples: int, ranks: int, workers: int, shard_size: int) -> dict:
    """Write the set with ``ranks`` processes x ``workers``: two or more under ``accelerate
    launch``, one in this process."""
    if ranks == 1:
        start = time.perf_counter()
        write_set(out, samples, workers, shard_size)
        seconds = time.perf_counter() - start
    else:
        args = ["-m", "benchmarks.scale", "--role", "prepare", "--set", str(out), "--samples", str(samples),
                "--workers", str(workers), "--shard-size", str(shard_size)]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(GLOO),
                  "--num_processes", str(ranks)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        seconds = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])["seconds"]
    return {"samples": samples, "ranks": ranks, "workers": workers, "seconds": seconds,
            "samples_per_s": samples / seconds}


def first_samples(src: Path, samples: int) -> Path:
    """A set of ``src``'s first shards holding ``samples`` samples: its own manifest, the shards
    linked (the loader reads them where they are)."""
    if samples >= load_manifest(src)["counts"]["train"]["total"]:
        return src
    out = src.parent / f"{src.name}-first{samples}"
    manifest = load_manifest(src)
    shards, total = [], 0
    for shard in manifest["shards"]:
        if total >= samples:
            break
        shards.append(shard)
        total += shard["samples"]
    out.mkdir(exist_ok=True)
    for shard in shards:
        link = out / shard["file"]
        if not link.exists():
            link.symlink_to(src / shard["file"])
    counts = {"train": {k: sum(s[k] for s in shards) for k in ("real", "fake")} | {"total": total}}
    view = {**manifest, "name": out.name, "counts": counts, "shards": shards, "id": manifest_id(shards)}
    (out / MANIFEST_NAME).write_text(json.dumps(view))
    return out


def stream(set_dir: Path, workers: int, batch_size: int, samples: int = 0) -> dict:
    """In this (fresh) process: the training loader over ``set_dir`` for ``samples`` samples
    (epoch after epoch; 0: one epoch): samples/s after the first batch, and the peak RSS of this
    process and of each worker."""
    from deepfake_dist.config import DataConfig
    from deepfake_dist.data.loader import train_loader

    cfg = DataConfig(train=[str(set_dir)], resolution=SIZE, batch_size=batch_size, num_workers=workers)
    loader, data = train_loader(cfg, 3, 0, 1, seed=0)
    start, seen, first, epoch = time.perf_counter(), 0, None, 0
    while first is None or seen < samples:
        data.set_epoch(epoch)
        for batch in loader:
            if first is None:
                first = time.perf_counter()
            else:
                seen += len(batch)
            if samples and seen >= samples:
                break
        epoch += 1
    seconds = time.perf_counter() - first
    workers_hwm = [_hwm_mib(child.pid) for child in psutil.Process().children()]
    return {"set_samples": load_manifest(set_dir)["counts"]["train"]["total"], "samples": seen,
            "samples_per_s": seen / seconds, "first_batch_s": first - start,
            "main_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mib": workers_hwm}


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _in_fresh_process(set_dir: Path, args, samples: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--role", "stream", "--set", str(set_dir),
                           "--samples", str(samples), "--loader-workers", str(args.loader_workers),
                           "--batch-size", str(args.batch_size)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_prepare(args, results: dict) -> Path:
    """The 1 -> 2 process scaling (1 and 2 processes taking turns, --repeats rounds), then the
    whole set (kept from an earlier run unless --fresh)."""
    if args.scaling_samples:
        scaling = args.data / f"scale-{args.scaling_samples}"
        runs = interleaved({f"{n} process": partial(prepare, scaling, args.scaling_samples, n, 1, args.shard_size)
                            for n in (1, 2)}, args.repeats)
        ratio = statistics.median(b["samples_per_s"] / a["samples_per_s"] for a, b in zip(*runs.values()))
        results["prepare_scaling"] = {"runs": runs, "median_2_vs_1": ratio}
        console.print(f"prepare {args.scaling_samples}: 2 processes / 1 process, median of {args.repeats} rounds: "
                      f"{ratio:.2f}x")
    full = args.data / f"scale-{args.samples}"
    try:
        kept = not args.fresh and load_manifest(full)["counts"]["train"]["total"] == args.samples
    except Exception:  # noqa: BLE001 - not made yet
        kept = False
    if not kept:
        results["prepare"] = prepare(full, args.samples, args.ranks, args.workers, args.shard_size)
        console.print(f"prepare {args.samples}: {results['prepare']['samples_per_s']:,.0f} samples/s")
    results["load_average"]["after_prepare"] = os.getloadavg()
    results["manifest_bytes"] = (full / MANIFEST_NAME).stat().st_size
    start = time.perf_counter()
    problems = verify(full)
    results["verify"] = {"seconds": time.perf_counter() - start, "problems": len(problems),
                         "set_bytes": sum(s["bytes"] for s in load_manifest(full)["shards"])}
    return full


def measure_loader(full: Path, args, results: dict) -> None:
    """Samples/s over the same --rate-samples from each size (the sizes taking turns, --repeats
    rounds, each in a fresh process), then one whole epoch of each for its peak RSS."""
    sets = {n: first_samples(full, n) for n in sorted(args.sizes)}
    runs = interleaved({str(n): partial(_in_fresh_process, path, args, args.rate_samples) for n, path in sets.items()},
                       args.repeats)
    smallest = str(min(sets))
    results["rate"] = {n: {"samples_per_s": statistics.median(r["samples_per_s"] for r in runs[n]),
                           "vs_smallest": statistics.median(r["samples_per_s"] / b["samples_per_s"]
                                                            for r, b in zip(runs[n], runs[smallest])),
                           "runs": runs[n]} for n in runs}
    results["load_average"]["after_rate"] = os.getloadavg()
    results["stream"] = [_in_fresh_process(path, args) for path in sets.values()]
    base = results["stream"][0]
    for row in results["stream"]:
        row["main_rss_vs_smallest"] = row["main_peak_rss_mib"] / base["main_peak_rss_mib"]
        row["worker_rss_vs_smallest"] = max(w / b for w, b in zip(row["worker_peak_rss_mib"], base["worker_peak_rss_mib"]))


def main() -> None:
    p = parser("scale", __doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--scaling-samples", dest="scaling_samples", type=int, default=20_000,
                   help="the set made by 1 and by 2 processes (0: not measured)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--rate-samples", dest="rate_samples", type=int, default=100_000,
                   help="samples streamed from each size for its rate")
    p.add_argument("--fresh", action="store_true", help="make the whole set again even if an earlier run made it")
    p.add_argument("--workers", type=int, default=1, help="prepare workers per rank")
    p.add_argument("--ranks", type=int, default=2, help="prepare processes for the whole set")
    p.add_argument("--loader-workers", dest="loader_workers", type=int, default=2)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000)
    p.add_argument("--role", choices=["main", "prepare", "stream"], default="main", help="internal")
    p.add_argument("--set", type=Path, help="internal")
    args = p.parse_args()
    if args.role == "prepare":
        write_set(args.set, args.samples, args.workers, args.shard_size)
        return
    if args.role == "stream":
        print(json.dumps(stream(args.set, args.loader_workers, args.batch_size, args.samples)))
        return
    started = machine()
    results: dict = {"load_average": {"start": os.getloadavg()}}
    full = measure_prepare(args, results)
    measure_loader(full, args, results)
    results["load_average"]["end"] = os.getloadavg()
    print_table(f"scale: the training loader over the first N samples of the set (samples/s: {args.rate_samples} "
                f"samples, median of {args.repeats} rounds; peak RSS: one whole epoch)",
                ["set samples", "samples/s", "vs smallest", "main peak RSS MiB", "worker peak RSS MiB",
                 "RSS vs smallest (main, worst worker)"],
                [[r["set_samples"], results["rate"][str(r["set_samples"])]["samples_per_s"],
                  results["rate"][str(r["set_samples"])]["vs_smallest"], r["main_peak_rss_mib"],
                  ", ".join(f"{w:.0f}" for w in r["worker_peak_rss_mib"]),
                  f"{r['main_rss_vs_smallest']:.3f}, {r['worker_rss_vs_smallest']:.3f}"] for r in results["stream"]])
    console.print(f"manifest {results['manifest_bytes'] / 1024:.0f} KiB; shards verify "
                  f"{results['verify']['seconds']:.0f} s over {results['verify']['set_bytes'] / 2**30:.2f} GiB "
                  f"({results['verify']['problems']} problems)")
    write_result("scale", args, results, started)


if __name__ == "__main__":
    main()
