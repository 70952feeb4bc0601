"""Entry point for launchers: ``accelerate launch launch/train.py --config configs/hybrid.yaml``.

Same code as ``deepfake-dist train``; kept as a file because launchers (accelerate, torchrun,
srun) take a script path.
"""

import sys

from deepfake_dist.cli import main
from deepfake_dist.engine.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(["train", *sys.argv[1:]]))
