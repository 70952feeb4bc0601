"""The GPU path (runs only where CUDA is present): training images/s and model FLOPs utilisation
(MFU) of ``resnet18`` and ``hybrid`` at 224 px and the DCGAN at 64 px, in fp32 / bf16 / fp16
(and, when asked, ``fp32-ieee``: fp32 with TF32 off),
with ``channels_last`` and ``torch.compile`` on and off (eager ones also with cuDNN's autotuner,
``torch.backends.cudnn.benchmark``, on and off); the platform's step against the bare step at
bf16; and the data loader's rate against the model's for 64-px faces at each worker count (which
one bounds, and the data wait when one feeds the other).

One prepared run with a total time bound (``--budget-s``): the eager grid first, then the
loader check, then ``torch.compile`` configurations (each compiles for tens of seconds) in order
of interest while the budget lasts; what did not fit is listed as skipped.

FLOPs of one training step come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions, forward and backward); MFU = FLOPs/s over the card's dense peak for the dtype
(``PEAK_TFLOPS``; fp32 runs use TF32 tensor cores, PyTorch's default for convolutions, with the
matmul precision set to "high" as well, so their peak is the TF32 one).

    deepfake-dist bench gpu [--budget-s 400]
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    alternating,
    console,
    face_set,
    machine,
    median_of,
    paired_ratio,
    parser,
    print_table,
    write_result,
)

# Dense (no sparsity) peak TFLOPS by card: (bf16, fp16, tf32); None where the card lacks it.
# The first name that is a substring of torch.cuda.get_device_name() wins, so specific first.
PEAK_TFLOPS = {
    "H200": (989.5, 989.5, 494.7),
    "H100 PCIe": (756.0, 756.0, 378.0),
    "H100 NVL": (835.5, 835.5, 417.5),
    "H100": (989.5, 989.5, 494.7),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    "GH200": (989.5, 989.5, 494.7),
    "A100": (312.0, 312.0, 156.0),
    "L40S": (362.1, 362.1, 183.0),
    "L40": (181.0, 181.0, 90.5),
    "L4": (121.0, 121.0, 60.0),
    "A10G": (70.0, 70.0, 35.0),
    "A10": (125.0, 125.0, 62.5),
    "RTX 4090": (165.2, 165.2, 82.6),
    "RTX 3090": (71.0, 71.0, 35.6),
    "V100": (None, 125.0, None),
    "T4": (None, 65.0, None),
}
# fp32: PyTorch's default, whose convolutions run on TF32 tensor cores; fp32-ieee: TF32 off
# (not in the default grid; its MFU is not computed: the table holds tensor-core peaks)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32-ieee": None}


def peak_tflops(device_name: str, precision: str, override: float | None = None) -> float | None:
    if override:
        return override
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_name:
            return peaks[{"bf16": 0, "fp16": 1, "fp32": 2}[precision]] if precision != "fp32-ieee" else None
    return None


class Setup:
    """One model's training step in one configuration, on in-memory tensors."""

    def __init__(self, model: str, batch: int, resolution: int, precision: str, channels_last: bool, compile_: bool,
                 device, cudnn_benchmark: bool = False):
        from deepfake_dist.models import create_model

        torch.backends.cudnn.benchmark = cudnn_benchmark  # autotunes each conv at its first call
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32-ieee"
        self.device, self.dtype = device, DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(0)
        if model == "dcgan":
            gan = create_model("dcgan", resolution=resolution, channels=3).to(device, memory_format=fmt)
            self.z_dim, self.modules = gan.z_dim, [gan.generator, gan.discriminator]
            self.x = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=fmt)
            self.opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in self.modules]
            self.run = self._gan_step
        else:
            net = create_model(model, in_channels=3).to(device, memory_format=fmt)
            self.modules = [net]
            self.x = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=fmt)
            self.y = (torch.arange(batch, device=device) % 2).float()
            self.opts = [torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.05)]
            self.run = self._detector_step
        self.calls = [torch.compile(m) if compile_ else m for m in self.modules]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _update(self, loss, opt, params) -> None:
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _detector_step(self) -> None:
        (net,), (opt,) = self.calls, self.opts
        with self._autocast():
            loss = F.binary_cross_entropy_with_logits(net(self.x).float(), self.y)
        self._update(loss, opt, self.modules[0].parameters())

    def _gan_step(self) -> None:
        (G, D), (opt_g, opt_d) = self.calls, self.opts
        with self._autocast():
            fake = G(torch.randn(len(self.x), self.z_dim, device=self.device))
            loss_d = F.softplus(-D(self.x).float()).mean() + F.softplus(D(fake.detach()).float()).mean()
        self._update(loss_d, opt_d, self.modules[1].parameters())
        self.modules[1].requires_grad_(False)
        with self._autocast():
            loss_g = F.softplus(-D(fake).float()).mean()
        self._update(loss_g, opt_g, self.modules[0].parameters())
        self.modules[1].requires_grad_(True)


def step_flops(model: str, batch: int, resolution: int, device) -> int:
    """FLOPs of one training step (forward + backward of every network in it), fp32 eager."""
    from torch.utils.flop_counter import FlopCounterMode

    setup = Setup(model, batch, resolution, "fp32", False, False, device)
    with FlopCounterMode(display=False) as counter:
        setup.run()
    return counter.get_total_flops()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, steps: int, windows: int) -> float:
    """Median steps/s over ``windows`` timed runs of ``steps`` steps, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def grid(args) -> list[dict]:
    """Every configuration to run, eager ones first, then compiled ones by interest."""
    eager, compiled = [], []
    for model in args.models:
        for precision in args.precisions:
            for cl in [layout == "channels_last" for layout in args.layouts]:
                config = {"model": model, "precision": precision, "channels_last": cl}
                eager += [{**config, "compile": False, "cudnn_benchmark": tune == "on"} for tune in args.cudnn_benchmark]
                if args.compile:
                    compiled.append({**config, "compile": True, "cudnn_benchmark": False})
    rank = {"bf16": 0, "fp16": 1, "fp32": 2, "fp32-ieee": 3}  # the settings one would train with come first
    compiled.sort(key=lambda c: (not c["channels_last"], rank[c["precision"]], args.models.index(c["model"])))
    return eager + compiled


def platform_vs_bare(args, model: str, channels_last: bool, device, set_dir) -> dict:
    """The platform's step (DetectorTask through Accelerate at bf16, ``train.channels_last`` as
    given) against the bare bf16 step in the same layout, taking turns step by step."""
    from benchmarks.trainer import bench_config, memory_batch, platform_step, warm

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config(model, set_dir, run_dir, args.batch_size, args.resolution,
                           ["train.mixed_precision=bf16", f"train.channels_last={str(channels_last).lower()}"])
        ours, _ = platform_step(cfg, memory_batch(cfg, set_dir, 3), 3)
        bare = Setup(model, args.batch_size, args.resolution, "bf16", channels_last, False, device)
        runs = alternating({"platform": warm(ours, args.warmup, device), "bare": warm(bare.run, args.warmup, device)},
                           args.batch_size, args.steps, args.windows, sync=functools.partial(_sync, device), show=False)
    return {"model": model, "resolution": args.resolution, "precision": "bf16", "channels_last": channels_last,
            "platform_images_per_s": median_of(runs["platform"], "per_s"),
            "bare_images_per_s": median_of(runs["bare"], "per_s"), "platform_vs_bare": paired_ratio(runs, "platform", "bare")}


def loader_vs_model(args, model: str, workers: int, device, set_dir) -> dict:
    """For 64-px faces: the loader alone, a detector's step alone (bf16, channels_last), and the
    two together as the training loop runs them (the loader moves each uint8 batch to the GPU and
    normalises it there; data wait measured)."""
    from deepfake_dist.config import DataConfig
    from deepfake_dist.data.loader import train_loader
    from deepfake_dist.models import create_model

    batch = args.loader_batch_size
    cfg = DataConfig(train=[str(set_dir)], resolution=64, batch_size=batch, num_workers=workers)
    loader, stream = train_loader(cfg, 3, 0, 1, seed=0, device=device)
    torch.backends.cudnn.benchmark = False  # the platform's setting
    net = create_model(model, in_channels=3).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    x = torch.randn(batch, 3, 64, 64, device=device).to(memory_format=torch.channels_last)
    y = torch.zeros(batch, device=device)
    model_rate = time_steps(lambda: step(x, y), device, args.warmup, args.steps, args.windows) * batch
    for _ in loader:  # warm-up epoch: workers start
        pass
    stream.set_epoch(1)
    seen, start = 0, time.perf_counter()
    for b in loader:
        seen += len(b)
    loader_rate = seen / (time.perf_counter() - start)
    stream.set_epoch(2)
    seen, wait, start = 0, 0.0, time.perf_counter()
    tick = start
    for b in loader:
        _sync(device)
        wait += time.perf_counter() - tick
        step(b.image.to(memory_format=torch.channels_last), b.label.float())
        _sync(device)
        tick = time.perf_counter()
        seen += len(b)
    total = time.perf_counter() - start
    return {"model": model, "batch_size": batch, "workers": workers, "loader_images_per_s": loader_rate,
            "model_images_per_s": model_rate, "together_images_per_s": seen / total, "data_wait_frac": wait / total,
            "bound_by": "loader" if loader_rate < model_rate else "model"}


def main(argv=None) -> dict:
    p = parser("gpu", __doc__)
    p.add_argument("--budget-s", dest="budget_s", type=float, default=400, help="total time bound of the run")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the script itself")
    p.add_argument("--models", nargs="+", default=["resnet18", "hybrid", "dcgan"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   choices=["contiguous", "channels_last"], help="memory formats to measure")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile configurations")
    p.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="cuDNN autotuner settings to measure the eager configurations with")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128, help="of the detectors")
    p.add_argument("--resolution", type=int, default=224, help="of the detectors")
    p.add_argument("--gan-batch-size", dest="gan_batch_size", type=int, default=256)
    p.add_argument("--gan-resolution", dest="gan_resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows per configuration (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-workers", dest="loader_workers", type=int, nargs="+",
                   default=[min(8, os.cpu_count() or 1)], help="worker counts to feed the model with")
    p.add_argument("--loader-batch-size", dest="loader_batch_size", type=int, default=256)
    p.add_argument("--loader-samples", dest="loader_samples", type=int, default=4096)
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, help="the card's dense peak, if not in the table")
    args = p.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("gpu: no CUDA device: skipped")
        return {"skipped": "no CUDA device"}
    started = machine()
    torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    console.print(f"gpu: {name}, budget {args.budget_s:.0f} s")
    batch_of = {m: args.gan_batch_size if m == "dcgan" else args.batch_size for m in args.models}
    size_of = {m: args.gan_resolution if m == "dcgan" else args.resolution for m in args.models}
    detector = next((m for m in args.models if m != "dcgan"), "resnet18")
    flops = {m: step_flops(m, batch_of[m], size_of[m], device) for m in args.models}
    results = {"device": name, "flops_per_step": flops, "batch_size": batch_of, "configs": [], "skipped": []}

    def run_config(config: dict) -> None:
        model = config["model"]
        row = {**config, "batch_size": batch_of[model], "resolution": size_of[model]}
        try:
            setup = Setup(model, batch_of[model], size_of[model], config["precision"], config["channels_last"],
                          config["compile"], device, config["cudnn_benchmark"])
            steps_per_s = time_steps(setup.run, device, args.warmup, args.steps, args.windows)
            peak = peak_tflops(name, config["precision"], args.peak_tflops)
            row |= {"images_per_s": steps_per_s * batch_of[model], "tflops": steps_per_s * flops[model] / 1e12}
            row["mfu"] = row["tflops"] / peak if peak else None
        except Exception as err:  # noqa: BLE001 - one configuration failing (e.g. no bf16 on the card) is recorded
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        setup = None
        if config["compile"]:
            torch._dynamo.reset()  # free the compiled graphs before the next configuration
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["configs"].append(row)
        console.print(f"  {row}", style="dim")

    def check_loader() -> None:
        set_dir = face_set(args.data, args.loader_samples, workers=max(*args.loader_workers, 1))
        results["platform_vs_bare"] = [platform_vs_bare(args, detector, cl == "channels_last", device, set_dir)
                                       for cl in args.layouts]
        results["loader_vs_model"] = [loader_vs_model(args, detector, w, device, set_dir) for w in args.loader_workers]

    for config in grid(args):
        if config["compile"] and "loader_vs_model" not in results:
            check_loader()  # before the compiled configurations, which may not all fit
        reserve = 90 if config["compile"] else 10  # a compile takes tens of seconds and cannot be cut short
        if deadline - time.perf_counter() < reserve:
            results["skipped"].append(config)
            continue
        run_config(config)
    if "loader_vs_model" not in results and deadline - time.perf_counter() > 30:
        check_loader()

    yes = {True: "yes", False: ""}
    rows = [[c["model"], c["precision"], yes[c["channels_last"]], yes[c["compile"]], yes[c["cudnn_benchmark"]],
             c.get("images_per_s"), c.get("tflops"), c.get("mfu"), c.get("error", "")] for c in results["configs"]]
    print_table(f"gpu: {name}, training step (median of {args.windows} windows)",
                ["model", "dtype", "channels_last", "compile", "cudnn autotune", "images/s", "TFLOP/s", "MFU", "error"],
                rows)
    if "loader_vs_model" in results:
        print_table(f"gpu: 64-px faces, loader against model ({detector}, bf16, channels_last)",
                    ["workers", "loader images/s", "model images/s", "together images/s", "data wait", "bound by"],
                    [[lm["workers"], lm["loader_images_per_s"], lm["model_images_per_s"], lm["together_images_per_s"],
                      lm["data_wait_frac"], lm["bound_by"]] for lm in results["loader_vs_model"]])
    for pb in results.get("platform_vs_bare", []):
        console.print(f"platform step / bare step ({pb['model']}, {pb['resolution']} px, bf16, "
                      f"{'channels_last' if pb['channels_last'] else 'contiguous'}): {pb['platform_vs_bare']:.3f}")
    if results["skipped"]:
        console.print(f"skipped for the budget: {len(results['skipped'])} configuration(s)")
    write_result("gpu", args, results, started)
    return results


if __name__ == "__main__":
    main()
