"""FID/KID of fixed images split over ranks, for tests/test_gan.py:

    accelerate launch --config_file configs/accelerate/cpu_gloo.yaml tests/fidelity_launch.py OUT_DIR

Rank r takes the r-th contiguous part of the real and fake images (so the gathered order is the
one-process order) and writes the values its ``Fidelity.compute`` returned to OUT_DIR/rank-r.json.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from deepfake_dist.engine.distributed import exit_process

N_REAL, N_FAKE = 24, 20


class SmallExtractor(nn.Module):
    """A fixed random conv + pooling: an 8-feature stand-in for Inception."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.relu(self.conv(x.float() / 255)).mean((2, 3))


def fixed_images() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 16, 16) real and fake images; the fakes are darker."""
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (N_REAL, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (torch.randint(0, 256, (N_FAKE, 3, 16, 16), generator=g) * 0.7).to(torch.uint8)
    return real, fake


def part(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = len(x)
    return x[rank * n // world:(rank + 1) * n // world]


def main() -> None:
    from accelerate import Accelerator

    from deepfake_dist.evaluation.fidelity import Fidelity

    acc = Accelerator(cpu=True)
    real, fake = fixed_images()
    metric = Fidelity(SmallExtractor(), kid_subsets=10, kid_subset_size=8)
    metric.update(part(real, acc.process_index, acc.num_processes), real=True)
    metric.update(part(fake, acc.process_index, acc.num_processes), real=False)
    values = {"rank": acc.process_index, **metric.compute(acc)}
    (Path(sys.argv[1]) / f"rank-{acc.process_index}.json").write_text(json.dumps(values))
    acc.end_training()  # closes the process group: left open, its threads can abort the rank at exit


if __name__ == "__main__":
    main()
    exit_process(0)  # as launch/train.py ends a rank
