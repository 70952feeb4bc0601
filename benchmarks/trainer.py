"""The training step: images/s of the platform's step (the task's ``train_step`` through the real
Accelerator, as the loop calls it) against a bare PyTorch loop with the same model, batch,
optimizer settings and gradient clipping, batches already in memory. Detectors ``cnn``,
``resnet18`` and ``hybrid`` at 64 px and the DCGAN at 64 px, each built from its shipped config
(``configs/NAME.yaml``); the field's baselines at DeepfakeBench's 256 px with ``--models xception
efficientnet_b4 --resolution 256``. Speed does not depend on the starting weights, so every model
starts from random ones (no pretrained file needed).

    deepfake-dist bench trainer [--models cnn resnet18 hybrid dcgan] [--steps 10]
"""

from __future__ import annotations

import functools
import tempfile

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import (
    REPO,
    alternating,
    console,
    face_set,
    machine,
    median_of,
    paired_ratio,
    parser,
    print_table,
    train_images,
    write_result,
)
from deepfake_dist.config import Config, load_config
from deepfake_dist.data import transforms
from deepfake_dist.data.handoff import Batch
from deepfake_dist.models import create_model, model_kind

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def bench_config(model: str, set_dir, run_dir: str, batch_size: int | None, resolution: int = 64,
                 extra: list[str] = ()) -> Config:
    """The shipped config of ``model``, on the benchmark's set, with no tracker, workers or samples
    (``extra``: more overrides)."""
    path = REPO / "configs" / f"{model}.yaml"
    random_start = ["model.pretrained=false"] if "pretrained" in yaml.safe_load(path.read_text())["model"] else []
    overrides = [f"data.train=[{set_dir}]", "data.val=null", "data.num_workers=0", f"data.resolution={resolution}",
                 "wandb.mode=disabled", f"output_dir={run_dir}", "samples.every=0", "samples.fid_every=0",
                 *random_start, *extra]
    if batch_size:
        overrides.append(f"data.batch_size={batch_size}")
    return load_config(path, overrides)


def memory_batch(cfg: Config, set_dir, channels: int) -> Batch:
    """One batch of real faces from the set, decoded and normalised once."""
    samples = train_images(set_dir)
    samples = (samples * (cfg.data.batch_size // len(samples) + 1))[: cfg.data.batch_size]
    transform = transforms.eval_transform(cfg.data.resolution, channels, cfg.data.normalize)
    images = torch.stack([transform(transforms.decode(data, channels)) for _, _, data in samples])
    labels = torch.tensor([label for _, label, _ in samples])
    return Batch(images, labels, [key for key, _, _ in samples], [b"{}" for _ in samples])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm(step, warmup: int, device):
    """``step`` after ``warmup`` untimed calls (first calls pick kernels and allocate)."""
    for _ in range(warmup):
        step()
    _sync(device)
    return step


def platform_step(cfg: Config, batch: Batch, channels: int):
    """The task's ``train_step`` on an Accelerator made as ``train`` makes it."""
    from deepfake_dist.engine.runtime import make_accelerator
    from deepfake_dist.tasks import task_class

    make_task = task_class(cfg)
    accelerator = make_accelerator(cfg, engines=make_task.engines)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg, accelerator, channels)
    task.set_total_steps(10**6)
    batch = batch.to(accelerator.device)
    return lambda: task.train_step(batch), accelerator.device


def bare_detector_step(cfg: Config, batch: Batch, channels: int, device):
    """forward, BCE, backward, clip, step, zero_grad: the plain PyTorch loop."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, in_channels=channels, **cfg.model.args).to(device)
    o = cfg.optim
    opt = OPTIMIZERS[o.name](model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    x, y = batch.image.to(device), batch.label.to(device).float()
    clip = cfg.train.grad_clip

    def step():
        model.train()
        loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bare_gan_step(cfg: Config, batch: Batch, channels: int, device):
    """The PyTorch DCGAN example's step: D on real and detached fakes, then G through D
    (non-saturating BCE), no EMA."""
    torch.manual_seed(cfg.seed)
    gan = create_model(cfg.model.name, resolution=cfg.data.resolution, channels=channels, **cfg.model.args).to(device)
    G, D = gan.generator, gan.discriminator
    o = cfg.optim
    opt_g = OPTIMIZERS[o.name](G.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    opt_d = OPTIMIZERS[o.name](D.parameters(), lr=cfg.gan.d_lr or o.lr, betas=o.betas, weight_decay=o.weight_decay)
    real = batch.image.to(device)

    def step():
        G.train()
        D.train()
        fake = G(torch.randn(len(real), gan.z_dim, device=device))
        loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-D(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    return step


def main(argv=None) -> dict:
    p = parser("trainer", __doc__)
    p.add_argument("--models", nargs="+", default=["cnn", "resnet18", "hybrid", "dcgan"],
                   help="configs/NAME.yaml of each model to measure")
    p.add_argument("--steps", type=int, default=6, help="timed steps per case and round (the cases alternate "
                   "step by step)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: each config's data.batch_size")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    started = machine()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector_set = face_set(args.data, 64)
    real_set = face_set(args.data, 64, fakes=False)
    results = {"threads": torch.get_num_threads(), "models": {}}
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.models:
            model = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]["name"]
            gan = model_kind(model) == "gan"
            set_dir = real_set if gan else detector_set  # generators learn from real faces only
            cfg = bench_config(name, set_dir, run_dir, args.batch_size, args.resolution)
            channels = 3
            batch = memory_batch(cfg, set_dir, channels)
            ours, device = platform_step(cfg, batch, channels)
            bare = (bare_gan_step if gan else bare_detector_step)(cfg, batch, channels, device)
            n = len(batch)
            console.print(f"trainer {name}: batch {n}, {args.steps} steps x {args.repeats} rounds on {device}")
            runs = alternating({"platform": warm(ours, args.warmup, device), "bare": warm(bare, args.warmup, device)},
                               n, args.steps, args.repeats, sync=functools.partial(_sync, device))
            row = {"batch_size": n, "resolution": cfg.data.resolution, "device": str(device), "runs": runs}
            for case in ("platform", "bare"):
                row[f"{case}_images_per_s"] = median_of(runs[case], "per_s")
                row[f"{case}_images_per_cpu_s"] = median_of(runs[case], "per_cpu_s")
            row["platform_vs_bare"] = paired_ratio(runs, "platform", "bare")
            row["platform_vs_bare_cpu"] = paired_ratio(runs, "platform", "bare", "per_cpu_s")
            results["models"][name] = row
            rows.append([name, n, row["platform_images_per_s"], row["bare_images_per_s"], row["platform_vs_bare"],
                         row["platform_vs_bare_cpu"]])
    print_table(f"trainer: images/s of one training step at {args.resolution} px (medians of {args.repeats} rounds)",
                ["model", "batch", "platform", "bare PyTorch", "platform / bare", "same, per CPU-s"], rows)
    write_result("trainer", args, results, started)
    return results


if __name__ == "__main__":
    main()
