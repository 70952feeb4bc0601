"""Generator costs: the FLOPs of one training image for each generator config, the training speed
of the CPU-sized configs through the trainer, and from the FLOPs the expected time per GPU of the
GPU-sized ones (an estimate: no GPU is measured here).

    deepfake-dist bench generators [--configs stylegan2 ddpm stylegan2_256 ddpm_128] [--steps 30] [--gpu-tflops 99]

- FLOPs: torch's FLOP formulas (``torch.utils.flop_counter``) over the task's real ``train_step``
  (one image, fp32 on the CPU). StyleGAN2's lazy penalties are counted on their own steps and spread over their interval
  (R1 every ``r1_every`` batches, path length every ``pl_every``).
- CPU speed: ``configs/stylegan2.yaml`` and ``configs/ddpm.yaml`` as they are, trained for
  ``--steps`` steps in this process on the bundled LFW faces (32 px, grey); the median of the
  trainer's logged images/s after the first record.
- GPU estimate: seconds per 1000 training images ("s/kimg", as NVlabs reports StyleGAN2) at
  ``--gpu-tflops`` sustained: by default 10% of an H100's dense bf16 peak, the utilisation this
  project measured for ResNet-18 in bf16 (BENCHMARKS.md, gpu).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.common import REPO, console, machine, parser, print_table, write_result
from deepfake_dist.config import load_config
from deepfake_dist.data.handoff import Batch
from deepfake_dist.data.prepare import prepare
from deepfake_dist.engine.runtime import make_accelerator
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.options import PrepareOptions
from deepfake_dist.tasks import create_task, task_class
from deepfake_dist.train.loop import train

CPU_CONFIGS = ("stylegan2", "ddpm")
GPU_CONFIGS = ("stylegan2_256", "ddpm_128")
H100_BF16_TFLOPS = 989.0


class CountFlops(TorchDispatchMode):
    """FLOPs of every operation torch's ``FlopCounterMode`` has a formula for (convolutions and
    matrix products, forward and backward). Not ``FlopCounterMode`` itself: its module tracking
    cannot follow ``autograd.grad`` of a leaf, which R1 takes."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def faces(data: Path) -> Path:
    """The bundled LFW faces as a 32-px real shard set (made once)."""
    out = data / "lfw-32"
    if not (out / "manifest.json").is_file():
        prepare(PrepareOptions(source="builtin:lfw", out=out, resolution=32, format="png", shard_size=10, overwrite=True))
    return out


def _config(name: str, shards: Path, run_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", [
        f"data.train=[{shards}]", "data.num_workers=0", f"output_dir={run_dir}", f"name={name}", "wandb.mode=disabled",
        "samples.every=0", "samples.fid_every=0", *overrides])


def train_flops(name: str, shards: Path, run_dir: Path, channels: int) -> float:
    """FLOPs of one training image of configs/NAME.yaml at its own resolution, in fp32."""
    cfg = _config(name, shards, run_dir, "train.mixed_precision=no")
    task = create_task(cfg, make_accelerator(cfg, engines=task_class(cfg).engines), channels)
    task.set_total_steps(1)
    size = cfg.data.resolution
    batch = Batch(image=torch.rand(1, channels, size, size) * 2 - 1, label=torch.zeros(1, dtype=torch.long),
                  key=["x"], meta_json=[b"{}"])

    def count(step: int = 1, **settings) -> float:
        """One step's FLOPs with ``stylegan2`` settings changed for it (the penalties on or off)."""
        saved = {key: getattr(cfg.stylegan2, key) for key in settings}
        for key, value in settings.items():
            setattr(cfg.stylegan2, key, value)
        task.step = step  # where the lazy penalties fall
        with CountFlops() as counter:
            task.train_step(batch)
        for key, value in saved.items():
            setattr(cfg.stylegan2, key, value)
        return counter.total

    if cfg.model.name != "stylegan2":
        return count()
    s = cfg.stylegan2
    plain = count(1, r1_gamma=0.0, pl_weight=0.0)
    r1 = count(0, pl_weight=0.0) - plain if s.r1_gamma else 0.0
    pl = count(0, r1_gamma=0.0) - plain if s.pl_weight else 0.0
    return plain + r1 / s.r1_every + pl / s.pl_every


def cpu_speed(name: str, shards: Path, run_dir: Path, steps: int) -> dict:
    """Images and steps per second of configs/NAME.yaml trained by the trainer in this process."""
    cfg = _config(name, shards, run_dir, f"train.max_steps={steps}", "train.epochs=100000", "train.log_every=5",
                  "checkpoint.every_epochs=100000")
    train(cfg)
    rates = [r["train/images_per_s"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "train/images_per_s" in r]
    images_per_s = statistics.median(rates[1:] or rates)
    return {"batch_size": cfg.data.batch_size, "images_per_s": images_per_s,
            "steps_per_s": images_per_s / cfg.data.batch_size}


def _reset_accelerate() -> None:
    """Each config builds its own Accelerator in this process (Accelerate keeps process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> None:
    p = parser("generators", __doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=[*CPU_CONFIGS, *GPU_CONFIGS], choices=[*CPU_CONFIGS, *GPU_CONFIGS])
    p.add_argument("--steps", type=int, default=30, help="training steps of each CPU-sized config")
    p.add_argument("--gpu-tflops", dest="gpu_tflops", type=float, default=0.1 * H100_BF16_TFLOPS,
                   help="sustained TFLOPS assumed for the GPU estimate")
    args = p.parse_args(argv)
    started = machine()
    shards = faces(args.data)
    results = {"threads": torch.get_num_threads(), "gpu_tflops_assumed": args.gpu_tflops, "configs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.configs:
            console.print(f"counting the FLOPs of a {name} training image")
            gflop = train_flops(name, shards, Path(run_dir), 1 if name in CPU_CONFIGS else 3) / 1e9
            _reset_accelerate()
            row = {"gflop_per_image": gflop, "gpu_s_per_kimg_estimate": gflop / args.gpu_tflops}
            if name in CPU_CONFIGS:
                console.print(f"training {name} for {args.steps} steps on the CPU")
                row.update(cpu_speed(name, shards, Path(run_dir), args.steps))
                row["cpu_gflops"] = gflop * row["images_per_s"]
                _reset_accelerate()
            results["configs"][name] = row
            rows.append([name, row["gflop_per_image"], row.get("images_per_s"), row.get("steps_per_s"),
                         row["gpu_s_per_kimg_estimate"]])
    print_table("generators: a training image's cost", ["config", "GFLOP / image", "CPU images/s", "CPU steps/s",
                                                        f"GPU s/kimg at {args.gpu_tflops:.0f} TFLOPS (estimate)"], rows)
    write_result("generators", args, results, started)


if __name__ == "__main__":
    main()
