"""The training data path: samples/s of the WebDataset pipeline (decode + augmentation +
batching + normalisation, the platform's ``train_loader`` on the CPU) at each ``num_workers``, against

* the limit: the same decode + augmentation + batch stacking + normalisation in a tight loop
  over the same encoded bytes already in memory, in as many processes as the loader has workers (at least
  one; one thread each), and
* torchvision's ``ImageFolder`` over the same images as files, with the same augmentation;

and the peak memory (RSS and USS of the process and its workers) while streaming the same
number of samples from sets of 1 000, 10 000 and 50 000, which stays flat when the pipeline
streams.

    deepfake-dist bench loader [--samples 4000] [--memory-samples 1000 10000 50000] [--workers 0 1 2]
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from benchmarks.common import (
    REPO,
    console,
    face_set,
    image_folder,
    interleaved,
    machine,
    measure,
    median_of,
    paired_ratio,
    parser,
    print_table,
    replicated_set,
    train_images,
    write_result,
)
from deepfake_dist.config import DataConfig
from deepfake_dist.data import transforms
from deepfake_dist.data.loader import resolve_channels, train_loader


def data_config(set_dir, workers: int, batch_size: int) -> DataConfig:
    return DataConfig(train=[str(set_dir)], resolution=64, batch_size=batch_size, num_workers=workers)


_LIMIT: dict = {}  # what a limit process decodes: the encoded images, the transform, the batch size


def _limit_setup(set_dir: str, batch_size: int) -> None:
    cfg = data_config(set_dir, 0, batch_size)
    channels = resolve_channels(cfg, cfg.train)
    _LIMIT.update(blobs=[data for _, _, data in train_images(set_dir)], channels=channels, batch_size=batch_size,
                  transform=transforms.TrainAugment(cfg.resolution, cfg.augment),
                  normalize=transforms.Normalize(channels, cfg.normalize))


def _share(part: int, parts: int) -> list[bytes]:
    """This part's images, cut to whole batches."""
    mine = _LIMIT["blobs"][part::parts]
    return mine[: len(mine) // _LIMIT["batch_size"] * _LIMIT["batch_size"]]


def _limit_run(part: int = 0, parts: int = 1, epochs: int = 1) -> None:
    """Decode + augment + stack + normalise this part's share of the images, ``epochs`` times."""
    torch.set_num_threads(1)
    size, channels, transform, normalize = (_LIMIT[k] for k in ("batch_size", "channels", "transform", "normalize"))
    mine = _share(part, parts)
    for _ in range(epochs):
        for start in range(0, len(mine), size):
            normalize(torch.stack([transform(transforms.decode(b, channels)) for b in mine[start:start + size]]))


def limit_case(set_dir, batch_size: int, epochs: int, cores: int):
    """Decode + augment + stack + normalise, nothing else, in ``cores`` processes each holding its share of
    the encoded images in memory: the rate those cores can reach on these bytes."""
    _limit_setup(str(set_dir), batch_size)
    total = sum(len(_share(p, cores)) for p in range(cores)) * epochs
    if cores == 1:
        return lambda: measure(total, lambda: _limit_run(0, 1, epochs))
    pool = multiprocessing.get_context("fork").Pool(cores, _limit_setup, (str(set_dir), batch_size))
    pool.starmap(_limit_run, [(p, cores, 1) for p in range(cores)])  # started and warm
    return lambda: measure(total, lambda: pool.starmap(_limit_run, [(p, cores, epochs) for p in range(cores)]))


def _epochs(loader, epochs, set_epoch=None) -> int:
    """Iterate ``epochs`` (epoch numbers) of ``loader``; the sample count."""
    seen = 0
    for epoch in epochs:
        if set_epoch:
            set_epoch(epoch)
        for batch in loader:
            seen += len(batch)
    return seen


def _loader_case(loader, epochs: int, set_epoch=None):
    """Each round times new epochs: the stream's augmentation draws are a function of the epoch, so
    timing the same epoch every round would weigh one fixed draw (its blur and JPEG work differ
    from one epoch to the next; BENCHMARKS.md, loader) against the limit's, which vary from round
    to round."""
    fresh = itertools.count(1)
    per_round = _epochs(loader, [0]) * epochs  # an untimed warm-up epoch (workers start)
    return lambda: measure(per_round, lambda: _epochs(loader, [next(fresh) for _ in range(epochs)], set_epoch))


def webdataset_case(cfg: DataConfig, epochs: int):
    """The platform's ``train_loader`` (persistent workers), as training uses it."""
    loader, stream = train_loader(cfg, resolve_channels(cfg, cfg.train), 0, 1, seed=0)
    return _loader_case(loader, epochs, stream.set_epoch)


class _NormalizedBatches:
    """A DataLoader of (uint8 images, labels) whose images are normalised as the platform's are."""

    def __init__(self, loader, normalize):
        self.loader, self.normalize = loader, normalize

    def __iter__(self):
        return (self.normalize(images) for images, _ in self.loader)


def imagefolder_case(folder, cfg: DataConfig, channels: int, epochs: int):
    """torchvision's ImageFolder (PIL decode) + the same augmentation and normalisation, shuffled,
    full batches."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    grey = [v2.Grayscale()] if channels == 1 else []
    augment = transforms.TrainAugment(cfg.resolution, cfg.augment)
    dataset = ImageFolder(str(folder), transform=v2.Compose([*grey, v2.PILToTensor(), augment]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    return _loader_case(_NormalizedBatches(loader, transforms.Normalize(channels, cfg.normalize)), epochs)


def peak_memory(set_dir, workers: int, batch_size: int, epochs: int) -> dict:
    """``epochs`` epochs in a fresh process (so nothing else this benchmark holds is counted)."""
    code = ("import sys, json; from benchmarks.loader import _memory_probe; "
            f"print(json.dumps(_memory_probe({str(set_dir)!r}, {workers}, {batch_size}, {epochs})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_probe(set_dir: str, workers: int, batch_size: int, epochs: int) -> dict:
    """Peak memory of this process and its workers together over ``epochs``, sampled every 20 ms:
    the sum of RSS (counts the pages forked workers share with it once per process, and the
    shared libraries) and of USS (pages private to each process: what a leak would grow)."""
    import psutil

    torch.set_num_threads(1)
    me = psutil.Process()
    peak, stop, uss_seen = {"rss": 0, "uss": 0}, threading.Event(), []

    def sample():
        while not stop.is_set():
            try:
                infos = [proc.memory_full_info() for proc in [me, *me.children(recursive=True)]]
            except psutil.Error:  # a worker that just started or ended: the next sample counts
                infos = []
            peak["rss"] = max(peak["rss"], sum(i.rss for i in infos))
            peak["uss"] = max(peak["uss"], sum(i.uss for i in infos))
            if infos:
                uss_seen.append(sum(i.uss for i in infos))
            stop.wait(0.02)

    cfg = data_config(set_dir, workers, batch_size)
    before = me.memory_full_info()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    loader, stream = train_loader(cfg, resolve_channels(cfg, cfg.train), 0, 1, seed=0)
    start, seen = time.perf_counter(), 0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in loader:
            seen += len(batch)
    elapsed = time.perf_counter() - start
    stop.set()
    watcher.join()
    return {"samples": seen, "seconds": elapsed, "samples_per_s": seen / elapsed,
            "rss_before_mib": before.rss / 2**20, "peak_rss_mib": peak["rss"] / 2**20,
            "peak_uss_mib": peak["uss"] / 2**20,
            # the steady state a leak would raise: brief start-up and shutdown peaks left out
            "late_uss_mib": (statistics.median(uss_seen[len(uss_seen) // 2:]) if uss_seen else peak["uss"]) / 2**20}


def main(argv=None) -> dict:
    p = parser("loader", __doc__)
    p.add_argument("--samples", type=int, default=4000, help="train samples of the throughput set (several times "
                   "data.shuffle_buffer, so epoch starts and ends weigh as little as in real training)")
    p.add_argument("--memory-samples", dest="memory_samples", type=int, nargs="+", default=[1000, 10000, 50000],
                   help="set sizes of the memory check (multiples of the first, made by copying its shards; "
                        "0 skips it)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values to measure")
    p.add_argument("--memory-workers", dest="memory_workers", type=int, default=2)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per case and round (after a warm-up epoch)")
    args = p.parse_args(argv)
    started = machine()
    torch.set_num_threads(1)  # one core per decode stream, as in a DataLoader worker

    small = face_set(args.data, args.samples, workers=len(os.sched_getaffinity(0)))
    folder = image_folder(small)
    cfg = data_config(small, 0, args.batch_size)
    channels = resolve_channels(cfg, cfg.train)
    cores = {w: max(1, min(w, len(os.sched_getaffinity(0)))) for w in args.workers}
    limit_name = {c: f"limit {c} core{'s' if c > 1 else ''}" for c in sorted(set(cores.values()))}
    cases = {limit_name[c]: limit_case(small, args.batch_size, args.epochs, c) for c in limit_name}
    for w in args.workers:
        cases[f"webdataset w{w}"] = webdataset_case(data_config(small, w, args.batch_size), args.epochs)
        cases[f"imagefolder w{w}"] = imagefolder_case(folder, data_config(small, w, args.batch_size), channels,
                                                      args.epochs)
    console.print(f"loader: {len(cases)} cases x {args.repeats} rounds, {args.samples} samples, "
                  f"{args.epochs} epochs each")
    runs = interleaved(cases, args.repeats)
    results = {"samples": args.samples, "batch_size": args.batch_size, "channels": channels,
               "runs": runs, "limit": {}, "workers": {}}
    rows = []
    for name in cases:
        if name.startswith("limit"):
            results["limit"][name.split()[1]] = {k: median_of(runs[name], k) for k in ("per_s", "per_cpu_s")}
            rows.append([f"{name}, in memory", median_of(runs[name], "per_s"), median_of(runs[name], "per_cpu_s"),
                         None, None, None])
    for w in args.workers:
        ours, theirs = runs[f"webdataset w{w}"], runs[f"imagefolder w{w}"]
        row = {"limit_cores": cores[w], "webdataset_per_s": median_of(ours, "per_s"),
               "imagefolder_per_s": median_of(theirs, "per_s"), "webdataset_per_cpu_s": median_of(ours, "per_cpu_s"),
               "imagefolder_per_cpu_s": median_of(theirs, "per_cpu_s")}
        wds, folder, lim = f"webdataset w{w}", f"imagefolder w{w}", limit_name[cores[w]]
        row |= {"webdataset_vs_limit": paired_ratio(runs, wds, lim), "imagefolder_vs_limit": paired_ratio(runs, folder, lim),
                "webdataset_vs_imagefolder": paired_ratio(runs, wds, folder),
                "webdataset_cpu_vs_limit": paired_ratio(runs, wds, lim, "per_cpu_s"),
                "imagefolder_cpu_vs_limit": paired_ratio(runs, folder, lim, "per_cpu_s")}
        results["workers"][str(w)] = row
        rows.append([f"webdataset, {w} workers", row["webdataset_per_s"], row["webdataset_per_cpu_s"],
                     row["webdataset_vs_limit"], row["webdataset_cpu_vs_limit"], row["webdataset_vs_imagefolder"]])
        rows.append([f"ImageFolder, {w} workers", row["imagefolder_per_s"], row["imagefolder_per_cpu_s"],
                     row["imagefolder_vs_limit"], row["imagefolder_cpu_vs_limit"], 1.0])
    print_table("loader: samples/s (medians of rounds; ratios: median of each round's ratio)",
                ["pipeline", "per s", "per CPU-s", "vs limit*", "CPU vs limit*", "vs ImageFolder"], rows)
    console.print("* the limit on as many cores as workers (at least one)")

    sizes = [n for n in args.memory_samples if n]
    if sizes:
        base = face_set(args.data, sizes[0])  # larger sets: copies of its shards under new keys
        sets = {n: base if n == sizes[0] else replicated_set(base, max(n // sizes[0], 1)) for n in sizes}
        memory_runs: dict[int, list[dict]] = {n: [] for n in sizes}
        # every set streams as many samples as the largest holds (the smaller ones for several
        # epochs): the workers' memory grows during their first seconds (copy-on-write pages,
        # allocator pools), so equal run lengths leave only what the set's size adds
        epochs = {n: max(max(sizes) // n, 1) for n in sizes}
        for r in range(args.repeats):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                memory_runs[n].append(peak_memory(sets[n], args.memory_workers, args.batch_size, epochs[n]))
                console.print(f"  round {r + 1}/{args.repeats} memory {n}: {memory_runs[n][-1]}", style="dim")
        first = sizes[0]
        memory = {"workers": args.memory_workers, "sets": {}}
        for n in sizes:
            row = {"set_samples": n, "streamed": memory_runs[n][0]["samples"], "runs": memory_runs[n],
                   **{k: median_of(memory_runs[n], k) for k in ("peak_rss_mib", "peak_uss_mib", "late_uss_mib")}}
            memory["sets"][str(n)] = row
        for n in sizes:
            row = memory["sets"][str(n)]
            for k in ("peak_rss", "peak_uss", "late_uss"):
                row[f"{k}_vs_first"] = row[f"{k}_mib"] / memory["sets"][str(first)][f"{k}_mib"]
        results["memory"] = memory
        print_table(f"loader: peak memory streaming {max(sizes)} samples from each set, process + "
                    f"{args.memory_workers} workers (median)",
                    ["set samples", "peak RSS MiB", "peak USS MiB", "late USS MiB", f"RSS vs {first}",
                     f"late USS vs {first}"],
                    [[r["set_samples"], r["peak_rss_mib"], r["peak_uss_mib"], r["late_uss_mib"], r["peak_rss_vs_first"],
                      r["late_uss_vs_first"]]
                     for r in memory["sets"].values()])

    write_result("loader", args, results, started)
    return results


if __name__ == "__main__":
    main()
