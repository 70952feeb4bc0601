"""Mid-epoch resume: the time from a resumed run's start to its first batch, at 90% of a
200 000-sample epoch (32-px synthetic faces, ``benchmarks/scale.py``'s set), when the loader
replays the epoch up to the resume point (decoding and augmenting every batch before it, as a
trainer that drops them would) against when it skips there (``set_epoch(epoch, batch)``: the
consumed samples drawn from their tar headers only), with the time to an epoch's first batch
for scale. Both yield the same batch (checked). Target: skip at most a tenth of replay.

    deepfake-dist bench resume [--samples 200000] [--at 0.9] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import gc
import time

import torch

from benchmarks.common import console, interleaved, machine, median_of, parser, print_table, write_result
from benchmarks.scale import first_samples, prepare
from deepfake_dist.config import DataConfig
from deepfake_dist.data.loader import train_loader
from deepfake_dist.data.manifest import load_manifest


def shard_set(args):
    """The first ``--samples`` of the scale benchmark's million when it has been made, else the
    scale benchmark's set of ``--samples`` (made now if need be)."""
    million = args.data / "scale-1000000"
    try:
        if load_manifest(million)["counts"]["train"]["total"] >= args.samples:
            return first_samples(million, args.samples)
    except Exception:  # noqa: BLE001 - not made yet
        pass
    own = args.data / f"scale-{args.samples}"
    try:
        load_manifest(own)
    except Exception:  # noqa: BLE001 - not made yet
        prepare(own, args.samples, 1, max(args.workers, 1), 1000)
    return own


def first_batch(set_dir, args, start: int, replay: bool) -> tuple[float, list[str], torch.Tensor]:
    """Seconds from a fresh loader to batch ``start`` of epoch 0, and that batch's keys and images."""
    cfg = DataConfig(train=[str(set_dir)], resolution=32, batch_size=args.batch_size, num_workers=args.workers,
                     persistent_workers=False)
    loader, stream = train_loader(cfg, 3, 0, 1, seed=0)
    began = time.perf_counter()
    stream.set_epoch(0, 0 if replay else start)
    batches = iter(loader)
    batch = next(batches)
    for _ in range(start if replay else 0):
        batch = next(batches)
    seconds = time.perf_counter() - began
    keys, images = batch.key, batch.image.clone()
    del batches, batch, loader
    gc.collect()
    return seconds, keys, images


def main() -> None:
    p = parser("resume", __doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--at", type=float, default=0.9, help="the resume point, a fraction of the epoch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.set_defaults(repeats=2)
    args = p.parse_args()
    started = machine()
    set_dir = shard_set(args)
    cfg = DataConfig(train=[str(set_dir)], resolution=32, batch_size=args.batch_size, num_workers=args.workers)
    _, stream = train_loader(cfg, 3, 0, 1, seed=0)
    per_epoch = stream.batches_per_worker * max(args.workers, 1)
    start = int(per_epoch * args.at)
    console.print(f"{set_dir}: {per_epoch} batches of {args.batch_size} an epoch; resuming at batch {start}")
    seen = {}

    def case(name: str, at: int, replay: bool):
        def run() -> dict:
            seconds, keys, images = first_batch(set_dir, args, at, replay)
            seen.setdefault(name, (keys, images))
            return {"seconds": seconds}
        return run

    runs = interleaved({"replay": case("replay", start, True), "skip": case("skip", start, False),
                        "epoch start": case("epoch start", 0, False)}, args.repeats)
    assert seen["replay"][0] == seen["skip"][0] and torch.equal(seen["replay"][1], seen["skip"][1]), \
        "the skipped-to batch differs from the replayed one"
    replay, skip, fresh = (median_of(runs[n], "seconds") for n in ("replay", "skip", "epoch start"))
    results = {"set": str(set_dir), "samples": args.samples, "batches_per_epoch": per_epoch, "resume_batch": start,
               "replay_s": replay, "skip_s": skip, "epoch_start_s": fresh, "skip_vs_replay": skip / replay,
               "runs": runs, "same_batch": True}
    print_table(f"resume at batch {start} of {per_epoch} ({args.samples} samples, {args.workers} workers): "
                "seconds to the first batch", ["case", "seconds", "vs replay"],
                [["replay", replay, 1.0], ["skip", skip, skip / replay], ["epoch start (no resume)", fresh, fresh / replay]])
    write_result("resume", args, results, started)


if __name__ == "__main__":
    main()
