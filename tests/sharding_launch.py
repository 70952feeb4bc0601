"""Run ``prepare`` under a launcher, for tests/test_sharding.py:

    accelerate launch --cpu --num_processes 2 tests/sharding_launch.py SOURCE OUT [--workers N] [--shard-size N] [--split F,F,F]

Every rank calls ``prepare``; each prints the manifest id it got back, with its rank.
"""

import argparse

from accelerate import PartialState

from deepfake_dist.data.prepare import prepare
from deepfake_dist.engine.distributed import exit_process
from deepfake_dist.options import PrepareOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--split", default="0.8,0.1,0.1")
    args = parser.parse_args()
    manifest = prepare(PrepareOptions(source=args.source, out=args.out, shard_size=args.shard_size, split=args.split,
                                      workers=args.workers))
    # one write with its newline: the ranks share the launcher's stdout, and unbuffered (as the
    # launcher runs them) print's separate write of the newline let two ranks' lines run together
    print(f"rank {PartialState().process_index} id {manifest['id']}\n", end="", flush=True)
    PartialState().destroy_process_group()  # left open, its threads can abort the rank at exit


if __name__ == "__main__":
    main()
    exit_process(0)  # as launch/train.py ends a rank
