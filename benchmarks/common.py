"""What every benchmark shares: the machine a figure came from, interleaved timing, JSON results,
tables, and the synthetic 64-px face shards the benchmarks read.

Timing on a shared machine: every comparison runs its cases one after the other inside a round,
the order rotating from round to round, and reports the median of the rounds, so that load from
other processes falls on all cases alike; the ratios between cases are the figures to trust.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from deepfake_dist.atomic import write_json_atomic
from deepfake_dist.data.manifest import MANIFEST_NAME, file_sha256, load_manifest, manifest_id
from deepfake_dist.options import PrepareOptions

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(tempfile.gettempdir()) / "deepfake_dist_bench"  # generated shard sets, reused between runs
console = Console(highlight=False, soft_wrap=True)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"deepfake-dist bench {name}", description=description)
    p.add_argument("--repeats", type=int, default=3, help="rounds of every case; the median is reported")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    p.add_argument("--data", type=Path, default=DATA, help="folder for the generated shard sets (reused)")
    return p


def machine() -> dict:
    """The hardware and software a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torchvision

    info = {
        "host": platform.node(), "cpu": cpu, "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "load_average": os.getloadavg(),
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--", "deepfake_dist")),
    }
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def interleaved(cases: dict[str, Callable[[], dict]], repeats: int, show: bool = True) -> dict[str, list[dict]]:
    """Each case's measurements (a dict, see ``measure``) from every round; round r starts at case r."""
    names = list(cases)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(cases[name]())
            if show:
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in runs[name][-1].items() if isinstance(v, float))
                console.print(f"  round {r + 1}/{repeats} {name}: {shown}", style="dim")
    return runs


def alternating(steps_of: dict[str, Callable[[], object]], items: int, steps: int, repeats: int,
                sync: Callable[[], None] = lambda: None, show: bool = True) -> dict[str, list[dict]]:
    """Rounds of ``steps`` calls of every case, the cases taking turns call by call (the order
    reversed every other call), so that each pair of calls meets the same load: the finest
    interleaving, for comparing two ways of doing one training step. Per round and case:
    ``per_s`` and ``per_cpu_s`` (this process's CPU time) of ``items`` per call."""
    names = list(steps_of)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for i in range(steps):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                w, c = time.perf_counter(), time.process_time()
                steps_of[name]()
                sync()
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c
        for name in names:
            runs[name].append({"per_s": items * steps / wall[name], "per_cpu_s": items * steps / max(cpu[name], 1e-9)})
        if show:
            shown = "; ".join(f"{n} {runs[n][-1]['per_s']:,.1f}/s {runs[n][-1]['per_cpu_s']:,.1f}/CPU-s" for n in names)
            console.print(f"  round {r + 1}/{repeats}: {shown}", style="dim")
    return runs


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str, key: str = "per_s") -> float:
    """Median over rounds of case ``a`` / case ``b`` measured in the same round."""
    return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b]))


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (DataLoader workers, pools)."""
    me = psutil.Process()
    total = me.cpu_times().user + me.cpu_times().system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass  # ended meanwhile
    return total


def measure(items: int, fn: Callable[[], object]) -> dict:
    """``per_s``: items per wall-clock second of one call of ``fn``; ``per_cpu_s``: items per CPU
    second of this process and its children (on a shared machine the latter hardly moves with
    the load, the former does)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"per_s": items / wall, "per_cpu_s": items / max(cpu, 1e-9), "seconds": wall}


def write_result(name: str, args: argparse.Namespace, results: dict, started: dict) -> Path:
    """``<out>/<name>-<host>-<date>.json``: the machine (load average before and after), the
    arguments and the results."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    finished = machine()
    path = out / f"{name}-{finished['host']}-{datetime.date.today():%Y-%m-%d}.json"
    record = {"benchmark": name, "time": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {**finished, "load_average_before": started["load_average"]},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results}
    write_json_atomic(path, record)
    json.loads(path.read_text())  # what was written reads back
    console.print(f"results written to {path}")
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    console.print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return "" if value is None else str(value)


# ------------------------------------------------------------------------------------ data


@functools.lru_cache(maxsize=1)
def _lfw_faces() -> np.ndarray:
    from skimage.data import lfw_subset

    return (lfw_subset()[:100] * 255).round().astype(np.uint8)  # the first 100 are faces


def face_image(index: int, fake: bool) -> Image.Image:
    """A 64-px RGB face: an LFW face (scikit-image's bundled subset) upscaled, tinted and mixed
    with smooth colour noise; a "fake" also carries a faint checkerboard (an upsampling trace)."""
    faces = _lfw_faces()
    rng = np.random.default_rng(index)
    face = np.asarray(Image.fromarray(faces[index % len(faces)]).resize((64, 64), Image.Resampling.BICUBIC), np.float32)
    noise = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
    rgb = 0.8 * face[..., None] * rng.uniform(0.6, 1.2, 3) + 0.2 * np.asarray(noise, np.float32)
    if fake:
        yy, xx = np.mgrid[:64, :64]
        rgb += (6.0 * (((yy + xx) % 2) * 2 - 1))[..., None]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def face_set(root: Path, train: int, val: int | None = None, shard_size: int = 250, fakes: bool = True,
             workers: int = 1) -> Path:
    """A shard set of ``train`` + ``val`` (default: an eighth, 16 to 100) 64-px RGB faces (half
    real, half fake; all real without ``fakes``) made by the platform's own ``prepare`` (with
    ``workers`` processes); built once under ``root`` and reused."""
    val = min(100, max(16, train // 8)) if val is None else val
    name = f"faces-{train}-{val}" + ("" if fakes else "-real")
    out = Path(root) / name
    if _complete(out, train):
        return out
    from deepfake_dist.data.prepare import prepare

    images = Path(root) / f".images-{name}"
    shutil.rmtree(images, ignore_errors=True)
    for i in range(train + val):
        label = ("real", "fake")[i % 2] if fakes else "real"
        (images / label).mkdir(parents=True, exist_ok=True)
        face_image(i, fake=label == "fake").save(images / label / f"face_{i:06d}.png")
    total = train + val
    prepare(PrepareOptions(source=f"folder:{images}", out=out, resolution=64, shard_size=shard_size,
                           split=(train / total, val / total, 0.0), overwrite=True, workers=workers))
    shutil.rmtree(images)
    return out


def _complete(set_dir: Path, train: int) -> bool:
    try:
        return load_manifest(set_dir)["counts"]["train"]["total"] == train
    except Exception:  # noqa: BLE001 - absent or unreadable: build it again
        return False


def replicated_set(src: Path, copies: int) -> Path:
    """``src`` with its train shards written ``copies`` times under new sample keys (a large
    set in seconds, for the streaming-memory check); its val shards once."""
    src = Path(src)
    manifest = load_manifest(src)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    out = src.parent / f"{src.name}-x{copies}"
    if _complete(out, copies * manifest["counts"]["train"]["total"]):
        return out
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for copy in range(copies):
        for shard in train:
            name = f"train-{len(shards):06d}.tar"
            _copy_shard(src / shard["file"], out / name, suffix=f"-c{copy}")
            shards.append({**shard, "file": name, "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)})
    for shard in manifest["shards"]:
        if shard["split"] != "train":
            shutil.copyfile(src / shard["file"], out / shard["file"])
            shards.append(shard)
    counts = json.loads(json.dumps(manifest["counts"]))
    counts["train"] = {k: v * copies for k, v in manifest["counts"]["train"].items()}
    write_json_atomic(out / MANIFEST_NAME, {**manifest, "name": out.name, "counts": counts, "shards": shards,
                                            "id": manifest_id(shards)})
    return out


def _copy_shard(src: Path, dst: Path, suffix: str) -> None:
    """Copy a tar, appending ``suffix`` to every sample key (``key.ext`` -> ``key<suffix>.ext``)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with tarfile.open(src) as reader, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as writer:
        for info in reader:
            key, ext = info.name.split(".", 1)
            data = reader.extractfile(info).read()
            info.name = f"{key}{suffix}.{ext}"
            writer.addfile(info, io.BytesIO(data))
    os.replace(tmp, dst)


def train_images(set_dir: Path) -> list[tuple[str, int, bytes]]:
    """``(key, label, encoded image)`` of every train sample, in shard order."""
    samples = []
    manifest = load_manifest(set_dir)
    for shard in manifest["shards"]:
        if shard["split"] != "train":
            continue
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(Path(set_dir) / shard["file"]) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        samples += [(key, int(m["cls"]), m[manifest["format"]]) for key, m in members.items()]
    return samples


def image_folder(set_dir: Path) -> Path:
    """The train images of a set as files, ``<set>-files/{real,fake}/<key>.<fmt>`` (the very
    bytes in the shards), for torchvision's ``ImageFolder``."""
    from deepfake_dist.data.common import LABEL_NAMES

    out = Path(set_dir).parent / f"{Path(set_dir).name}-files"
    samples, fmt = train_images(set_dir), load_manifest(set_dir)["format"]
    if out.is_dir() and sum(1 for _ in out.rglob(f"*.{fmt}")) == len(samples):
        return out
    for key, label, data in samples:
        (out / LABEL_NAMES[label]).mkdir(parents=True, exist_ok=True)
        (out / LABEL_NAMES[label] / f"{key}.{fmt}").write_bytes(data)
    return out
