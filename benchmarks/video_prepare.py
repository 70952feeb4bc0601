"""How fast ``prepare --source videos:`` turns videos into clip shards, on this machine.

Writes synthetic mp4 videos (a real face moving over a background, ``tests/video_data.py``) at a
chosen size and length, then times ``prepare`` with the default video options (clips of 8 frames,
every 2nd frame, 4 clips per video, Haar face detection) for each ``--workers`` value. Reports
videos/s, decoded frames/s (every frame up to the last sampled one is decoded) and face-cropped
frames/s (the frames that go into the shards), per wall-clock second and per CPU second (the
latter hardly moves when other jobs share the machine).

    python benchmarks/video_prepare.py --videos 16 --size 640x360 --frames 300 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from video_data import write_video  # noqa: E402 - from the tests folder, added above

from deepfake_dist.data.faces import VideoOptions, clip_indices  # noqa: E402
from deepfake_dist.data.prepare import prepare  # noqa: E402
from deepfake_dist.options import PrepareOptions  # noqa: E402


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the spawned workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--size", default="640x360", help="frame WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=300, help="frames per video (300 = 10 s at 30 fps)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    opts = VideoOptions()
    clips = clip_indices(args.frames, opts)
    decoded = (max(i for c in clips for i in c) + 1) * args.videos
    cropped = sum(len(c) for c in clips) * args.videos
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        for i in range(args.videos):
            write_video(root / ("real" if i % 2 == 0 else "fake") / f"v{i:03d}.mp4", args.frames, fake=i % 2 == 1,
                        seed=i, size=(width, height), fps=30.0)
        results = []
        for workers in args.workers:
            start, cpu = time.perf_counter(), _cpu_seconds()
            manifest = prepare(PrepareOptions(source=f"videos:{root}", out=Path(tmp) / f"out-{workers}",
                                              resolution=args.resolution, workers=workers, overwrite=True))
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            clips_written = sum(manifest["counts"][s]["total"] for s in ("train", "val", "test"))
            results.append({"workers": workers, "seconds": round(seconds, 2), "videos_per_s": round(args.videos / seconds, 2),
                            "decoded_frames_per_s": round(decoded / seconds, 1),
                            "cropped_frames_per_s": round(cropped / seconds, 1), "cpu_seconds": round(cpu, 2),
                            "cropped_frames_per_cpu_s": round(cropped / cpu, 1), "clips": clips_written,
                            "skipped": len(manifest["skipped"])})
    print(json.dumps({"videos": args.videos, "size": args.size, "frames_per_video": args.frames,
                      "options": {"frames": opts.frames, "clips_per_video": opts.clips_per_video,
                                  "frame_step": opts.frame_step, "sampling": opts.sampling},
                      "resolution": args.resolution, "results": results}, indent=1))


if __name__ == "__main__":
    main()
