"""How fast ``prepare`` turns videos into face shards: videos/s per process, the scaling from 1 to
2 worker processes, and where a video's time goes (decode, face detection, encode).

The videos are a replica of a published dataset (``tests/benchmark_replicas.py``: FaceForensics++
by default, at a chosen frame size and length) or, with ``--dataset videos``, a ``videos:PATH``
folder of synthetic clips (``tests/video_data.py``); they are written once under ``--data`` and
reused. The dataset's own defaults apply (FF++: 32 frames a video spread over it, one sample a
frame, 256 px PNG); ``--frames`` overrides the frames a video.

* Scaling: ``prepare`` with each ``--workers`` value, the runs interleaved round by round
  (``benchmarks.common``), the median reported; videos/s over wall-clock time and per process,
  and over CPU time (this process and its finished workers). On a machine that other jobs
  share, the wall-clock speed-up only says how many cores were free; so the speed-up on free
  cores is also estimated from CPU times: a run's critical path is the main process's CPU time
  plus that of its busiest worker (the workers' CPU time, split between them as a poll of
  their CPU counters says). Every process runs OpenCV on ``--opencv-threads`` threads (1 by
  default, so that the figures are per process, as ``bench ddp`` runs one thread a process;
  0: OpenCV's default, all cores, which lets its face detection use a free core in a lone
  process and makes the CPU-time estimate meaningless).
* Stages, in this process on the first ``--stage-videos`` videos, in CPU seconds: decoding the
  sampled frames (``faces.sample_frames``: every frame up to the last sampled one is decoded),
  face detection on them, then tracking and cropping, and resizing + PNG encoding of the crops
  (``imageio``), as ``prepare`` does them.

    deepfake-dist bench video_prepare [--dataset ffpp] [--pairs 4 1 1] [--size 640x360]
        [--video-frames 300] [--workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

import cv2
import psutil

from benchmarks.common import REPO, console, interleaved, machine, median_of, paired_ratio, parser, print_table, write_result
from deepfake_dist.data import imageio
from deepfake_dist.data.faces import (
    VideoFaces,
    cut_samples,
    face_detector,
    largest_track,
    options_from_settings,
    sample_frames,
)
from deepfake_dist.data.prepare import RESOLUTION, prepare
from deepfake_dist.data.sources import open_source
from deepfake_dist.options import PrepareOptions

sys.path.insert(0, str(REPO / "tests"))

import benchmark_replicas  # noqa: E402 - from the tests folder, added above
from video_data import write_video  # noqa: E402

DATASETS = ("ffpp", "celebdf", "dfdc", "dfdcp", "videos")


def _cpu() -> tuple[float, float]:
    """User + system CPU seconds of this process, and of its finished children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


class _WorkerPoll(threading.Thread):
    """Reads the CPU time of each child process twice a second while ``prepare`` runs: how the
    workers' CPU time (known exactly once they end) was shared between them."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.5):
            for child in me.children(recursive=True):
                try:
                    times = child.cpu_times()
                except psutil.Error:
                    continue
                self.seen[child.pid] = times.user + times.system

    def busiest_share(self) -> float:
        self.done.set()
        self.join()
        total = sum(self.seen.values())
        return max(self.seen.values()) / total if total else 0.0


def build(args) -> Path:
    """The dataset's replica under ``--data``, written once (a marker file says it is complete)."""
    size = tuple(int(v) for v in args.size.split("x"))
    root = args.data / f"video-{args.dataset}-{args.size}-{args.video_frames}-{'-'.join(map(str, args.pairs))}"
    if (root / ".complete").is_file():
        return root
    console.print(f"writing the {args.dataset} replica under {root} ...")
    if args.dataset == "ffpp":
        benchmark_replicas.build_ffpp(root, pairs=tuple(args.pairs), frames=args.video_frames, size=size)
    elif args.dataset == "videos":
        for i in range(sum(args.pairs) * 10):
            write_video(root / ("real" if i % 2 == 0 else "fake") / f"v{i:03d}.mp4", args.video_frames,
                        fake=i % 2 == 1, seed=i, size=size, fps=30.0)
    else:
        getattr(benchmark_replicas, f"build_{args.dataset}")(root, frames=args.video_frames, size=size)
    (root / ".complete").touch()
    return root


def scaling(spec: str, args, videos: int) -> dict:
    """``prepare`` at each worker count, interleaved over ``--repeats`` rounds."""
    out = args.data / "video-prepare-out"
    options = {} if args.frames is None else {"frames": args.frames}

    def case(workers: int):
        def run() -> dict:
            poll = _WorkerPoll()
            (own, kids), start = _cpu(), time.perf_counter()
            poll.start()
            manifest = prepare(PrepareOptions(source=spec, out=str(out / str(workers)), workers=workers,
                                              shard_size=args.shard_size, overwrite=True, options=options))
            wall = time.perf_counter() - start
            own, kids = (now - before for now, before in zip(_cpu(), (own, kids)))
            critical = own + kids * poll.busiest_share()
            samples = sum(manifest["counts"][s]["total"] for s in ("train", "val", "test"))
            return {"per_s": videos / wall, "per_cpu_s": videos / (own + kids), "per_critical_cpu_s": videos / critical,
                    "seconds": wall, "samples": samples, "shards": len(manifest["shards"]),
                    "skipped": len(manifest["skipped"])}
        return run

    runs = interleaved({f"workers={w}": case(w) for w in args.workers}, args.repeats)
    rows = {}
    for w in args.workers:
        run = runs[f"workers={w}"]
        rows[str(w)] = {"videos_per_s": median_of(run, "per_s"), "videos_per_s_per_process": median_of(run, "per_s") / w,
                        "videos_per_cpu_s": median_of(run, "per_cpu_s"), "seconds": median_of(run, "seconds"),
                        **{k: run[0][k] for k in ("samples", "shards", "skipped")}}
    base = f"workers={args.workers[0]}"
    for w in args.workers[1:]:
        rows[str(w)]["speedup_vs_first"] = paired_ratio(runs, f"workers={w}", base)
        rows[str(w)]["speedup_on_free_cores"] = paired_ratio(runs, f"workers={w}", base, key="per_critical_cpu_s")
    return rows


def stages(spec: str, args) -> dict:
    """CPU seconds per video in each stage, over the first ``--stage-videos`` videos, in this process."""
    options = {} if args.frames is None else {"frames": args.frames}
    source = open_source(spec, options=options)
    opts = options_from_settings(source.preprocessing["video"])
    resolution = source.resolution or RESOLUTION
    detect = face_detector(opts.face_model, opts.face_config)
    spent = {"decode": 0.0, "detect": 0.0, "track_crop": 0.0, "encode": 0.0}
    items = sorted(source.items, key=lambda item: item.key)[: args.stage_videos]
    for item in items:
        t0 = time.process_time()
        clips, frames, n_frames, fps = sample_frames(item.origin, opts)
        t1 = time.process_time()
        found = {i: detect(frames[i]) for i in sorted(frames)}
        t2 = time.process_time()
        video = VideoFaces(clips, frames, [largest_track({i: found[i] for i in clip}) for clip in clips], n_frames, fps)
        crops = [s.image for s in cut_samples(video, opts).samples]
        t3 = time.process_time()
        for crop in crops:
            for image in crop if isinstance(crop, list) else [crop]:
                imageio.encode(imageio.preprocess(image, "RGB", resolution), "png")
        t4 = time.process_time()
        for stage, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[stage] += seconds
    total = sum(spent.values())
    return {"videos": len(items), "seconds_per_video": {k: v / len(items) for k, v in spent.items()},
            "share": {k: v / total for k, v in spent.items()}}


def main() -> None:
    p = parser("video_prepare", __doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, default="ffpp")
    p.add_argument("--pairs", type=int, nargs=3, default=[4, 1, 1],
                   help="ffpp: id pairs in train, val, test (videos: 10x their sum)")
    p.add_argument("--size", default="640x360", help="frame WIDTHxHEIGHT of the written videos")
    p.add_argument("--video-frames", dest="video_frames", type=int, default=300, help="frames a written video")
    p.add_argument("--frames", type=int, help="frames sampled a video (default: the dataset's)")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=5,
                   help="videos a shard (5: the default replica's 60 videos in 12 shards, 6 a worker for 2)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stage-videos", dest="stage_videos", type=int, default=12)
    p.add_argument("--opencv-threads", dest="opencv_threads", type=int, default=1,
                   help="OpenCV threads in every process (0: OpenCV's default)")
    args = p.parse_args()
    if args.opencv_threads:  # this process, and the spawned workers when they import OpenCV
        os.environ["OPENCV_FOR_THREADS_NUM"] = str(args.opencv_threads)
        cv2.setNumThreads(args.opencv_threads)
    started = machine()
    root = build(args)
    spec = f"{args.dataset}:{root}"
    videos = len(open_source(spec, options={} if args.frames is None else {"frames": args.frames}).items)
    console.print(f"{videos} videos ({args.size}, {args.video_frames} frames); load average {started['load_average']}")
    results = {"videos": videos, "stages": stages(spec, args), "workers": scaling(spec, args, videos)}
    print_table("video prepare: scaling", ["workers", "videos/s", "per process", "videos/CPU-s", "speed-up",
                                           "speed-up on free cores"],
                [[w, r["videos_per_s"], r["videos_per_s_per_process"], r["videos_per_cpu_s"], r.get("speedup_vs_first"),
                  r.get("speedup_on_free_cores")] for w, r in results["workers"].items()])
    share = results["stages"]
    print_table("video prepare: where a video's time goes (one process)", ["stage", "CPU-s/video", "share"],
                [[k, share["seconds_per_video"][k], share["share"][k]] for k in share["share"]])
    write_result("video_prepare", args, results, started)


if __name__ == "__main__":
    main()
