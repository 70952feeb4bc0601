"""``deepfake-dist train`` with the ``fault_probe`` model registered, for launched ranks."""

import sys

import probe_model  # noqa: F401 - registers fault_probe

from deepfake_dist.cli import main
from deepfake_dist.engine.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(["train", *sys.argv[1:]]))
