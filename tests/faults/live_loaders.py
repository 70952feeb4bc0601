"""Start many data loaders under the trainer's live progress bar, on a terminal: each loader
forks its workers while the bar's refresh thread draws, and each worker writes to stderr on its
first sample (as a library's warning would). Run by ``test_live_fork.py`` on a pseudo-terminal:
``python live_loaders.py SHARD_SET RUNS LOADERS``; it writes how many loaders it got through to
``RUNS/started``."""

from __future__ import annotations

import sys
from pathlib import Path

from inject import SMOKE

from deepfake_dist.config import load_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.engine.runtime import make_accelerator
from deepfake_dist.engine.tracking import Tracker

_written = False


def chatty(image):
    """A worker's evaluation transform that writes one line to stderr, once per worker."""
    global _written
    if not _written:
        _written = True
        print("a worker writes to stderr", file=sys.stderr)
    return image


def main(shards: str, runs: str, loaders: int) -> None:
    cfg = load_config(SMOKE, [f"data.train=[{shards}]", f"output_dir={runs}", "wandb.mode=disabled"])
    cfg.run_dir.mkdir(parents=True)
    tracker = Tracker(make_accelerator(cfg), cfg, total_steps=loaders, start_step=0)
    assert tracker.progress.live.is_started, "the progress bar is not live: stderr is not a terminal"
    options = EvalOptions(resolution=32, channels=1, batch_size=32, num_workers=2)
    for started in range(1, loaders + 1):
        for _ in eval_loader([shards, shards], "val", options, perturb=chatty):  # two shards: two workers
            pass
        tracker.advance(started, 0, {"loaders": started})
        (Path(runs) / "started").write_text(str(started))
    tracker.close({"loaders": loaders})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
