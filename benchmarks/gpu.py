"""The GPU path (runs only where CUDA is present): training images/s and model FLOPs utilisation
(MFU) of ``resnet18`` and ``hybrid`` at 224 px and the DCGAN at 64 px, in fp32 / bf16 / fp16
(and, when asked, ``fp32-ieee``: fp32 with TF32 off),
with ``channels_last`` and ``torch.compile`` on (in each ``--compile-modes``) and off (eager ones also with cuDNN's autotuner,
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

import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
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
    """One model's training step in one configuration, on in-memory tensors. Detectors step a
    fused AdamW by default, as the platform's detector task does (``fused=False``: torch's
    default, foreach); the GAN torch's default Adam, as its task does."""

    def __init__(self, model: str, batch: int, resolution: int, precision: str, channels_last: bool,
                 compile_mode: str | None, device, cudnn_benchmark: bool = False, fused: bool = True):
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
            self.opts = [torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.05, fused=fused or None)]
            self.run = self._detector_step
        self.calls = [torch.compile(m, mode=compile_mode) if compile_mode else m for m in self.modules]

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
        self.detector_step(self.x, self.y)

    def detector_step(self, x, y) -> None:
        """One step on the batch given (the loader's, in ``loader_vs_model``)."""
        (net,), (opt,) = self.calls, self.opts
        with self._autocast():
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
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

    setup = Setup(model, batch, resolution, "fp32", False, None, device)
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
                for batch in [args.gan_batch_size] if model == "dcgan" else args.batch_size:
                    config = {"model": model, "batch_size": batch, "precision": precision, "channels_last": cl}
                    eager += [{**config, "compile": None, "cudnn_benchmark": tune == "on"}
                              for tune in args.cudnn_benchmark]
                    compiled += [{**config, "compile": mode, "cudnn_benchmark": False} for mode in args.compile_modes]
    rank = {"bf16": 0, "fp16": 1, "fp32": 2, "fp32-ieee": 3}  # the settings one would train with come first
    compiled.sort(key=lambda c: (args.compile_modes.index(c["compile"]), not c["channels_last"],
                                 args.models.index(c["model"]), rank[c["precision"]]))
    return eager + compiled


def speedups(configs: list[dict], fast: str, base: str) -> list[dict]:
    """images/s in precision ``fast`` over ``base`` for each configuration measured in both."""
    keys = ("model", "batch_size", "channels_last", "compile", "cudnn_benchmark")
    rates = {(tuple(c[k] for k in keys), c["precision"]): c["images_per_s"] for c in configs if c.get("images_per_s")}
    return [{**dict(zip(keys, same)), "ratio": rate / rates[same, base]}
            for (same, precision), rate in rates.items() if precision == fast and (same, base) in rates]


def in_turn(cases: dict, items: int, steps: int, rounds: int, device) -> dict[str, list[dict]]:
    """Rounds of ``steps`` calls of each case back to back, waiting for the GPU only at the end
    of each (as training runs: a wait per call would hide the waits a step makes itself); the
    cases take turns round by round, the order reversed every other round. Per round and case:
    ``per_s`` of ``items`` per call."""
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                cases[name]()
            _sync(device)
            runs[name].append({"per_s": items * steps / (time.perf_counter() - start)})
    return runs


def host_waits(step, device, calls: int = 10) -> dict | None:
    """How many times per call ``step`` makes the host wait for the GPU, and from where (CUDA's
    sync debug mode warns at each; the Python line that asked); None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchroniz" in str(w.message)]
    return {"per_step": len(waits) / calls, "sites": sorted({f"{w.filename}:{w.lineno}" for w in waits})}


def platform_vs_bare(args, model: str, channels_last: bool, device, set_dir) -> dict:
    """The platform's step (DetectorTask through Accelerate at bf16, ``train.channels_last`` as
    given) against the bare bf16 step in the same layout, with torch's default optimizer and with
    the fused one the platform uses, taking turns (``in_turn``); and the host's waits per step."""
    from benchmarks.trainer import bench_config, memory_batch, platform_step, warm

    batch = args.batch_size[0]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config(model, set_dir, run_dir, batch, args.resolution,
                           ["train.mixed_precision=bf16", f"train.channels_last={str(channels_last).lower()}"])
        ours, _ = platform_step(cfg, memory_batch(cfg, set_dir, 3), 3)
        cases = {"platform": ours}
        for name, fused in (("bare", False), ("bare_fused", True)):
            cases[name] = Setup(model, batch, args.resolution, "bf16", channels_last, None, device, fused=fused).run
        runs = in_turn({name: warm(step, args.warmup, device) for name, step in cases.items()}, batch, args.steps,
                       args.windows * 3, device)
        waits = {f"{name}_host_waits": host_waits(step, device) for name, step in cases.items()}
    return {"model": model, "resolution": args.resolution, "batch_size": batch, "precision": "bf16",
            "channels_last": channels_last, **{f"{n}_images_per_s": median_of(runs[n], "per_s") for n in runs},
            "platform_vs_bare": paired_ratio(runs, "platform", "bare"),
            "platform_vs_bare_fused": paired_ratio(runs, "platform", "bare_fused"), **waits}


def loader_vs_model(args, model: str, workers: int, augment: bool, nice: int, device, set_dir) -> dict:
    """For 64-px faces: the loader alone, a detector's step alone (``Setup``'s: bf16,
    channels_last, fused AdamW, clipping), and the two together as the platform's loop runs
    them: no wait for the GPU between steps, and the data wait is the time spent getting the
    next batch, as the loop logs it
    (``train/data_wait_frac``). The model alone is timed with the loader's workers started and
    idle. Without ``augment`` the workers only decode: what the loader would give with its
    augmentation off the CPU. ``nice``: ``data.worker_nice``."""
    from deepfake_dist.config import AugmentConfig, DataConfig
    from deepfake_dist.data.loader import train_loader

    batch = args.loader_batch_size
    aug = AugmentConfig() if augment else AugmentConfig(hflip=0, crop=0, jitter=0, jpeg=0, blur=0)
    cfg = DataConfig(train=[str(set_dir)], resolution=64, batch_size=batch, num_workers=workers, augment=aug,
                     worker_nice=nice)
    loader, stream = train_loader(cfg, 3, 0, 1, seed=0, device=device)
    setup = Setup(model, batch, 64, "bf16", True, None, device)
    for _ in loader:  # warm-up epoch: workers start
        pass
    model_rate = time_steps(setup.run, device, args.warmup, args.steps * 3, args.windows) * batch
    epochs = range(1, 1 + args.loader_epochs)
    seen, start = 0, time.perf_counter()
    for epoch in epochs:
        stream.set_epoch(epoch)
        for b in loader:
            seen += len(b)
    _sync(device)
    loader_rate = seen / (time.perf_counter() - start)
    seen, wait, start = 0, 0.0, time.perf_counter()
    for epoch in epochs:
        stream.set_epoch(len(epochs) + epoch)
        batches = iter(loader)
        while True:
            tick = time.perf_counter()
            b = next(batches, None)
            wait += time.perf_counter() - tick
            if b is None:
                break
            setup.detector_step(b.image.to(memory_format=torch.channels_last), b.label.float())
            seen += len(b)
    _sync(device)
    total = time.perf_counter() - start
    return {"model": model, "batch_size": batch, "workers": workers, "augment": augment, "worker_nice": nice,
            "loader_images_per_s": loader_rate, "model_images_per_s": model_rate,
            "together_images_per_s": seen / total, "together_vs_model": seen / total / model_rate,
            "data_wait_frac": wait / total, "bound_by": "loader" if loader_rate < model_rate else "model"}


def main(argv=None) -> dict:
    p = parser("gpu", __doc__)
    p.add_argument("--budget-s", dest="budget_s", type=float, default=400, help="total time bound of the run")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the script itself")
    p.add_argument("--models", nargs="+", default=["resnet18", "hybrid", "dcgan"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                   choices=["contiguous", "channels_last"], help="memory formats to measure")
    p.add_argument("--compile-modes", dest="compile_modes", nargs="*", default=["default"],
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile modes to measure each configuration in (none: eager only)")
    p.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="cuDNN autotuner settings to measure the eager configurations with")
    p.add_argument("--batch-size", dest="batch_size", type=int, nargs="+", default=[128],
                   help="of the detectors (the first for the platform check)")
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
    p.add_argument("--loader-epochs", dest="loader_epochs", type=int, default=3, help="timed epochs per loader case")
    p.add_argument("--loader-augment", dest="loader_augment", nargs="+", default=["on"], choices=["on", "off"],
                   help="loader cases with the training augmentation, and without (decode only)")
    p.add_argument("--loader-nice", dest="loader_nice", type=int, nargs="+", default=[10],
                   help="data.worker_nice values to run the loader cases with")
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
    size_of = {m: args.gan_resolution if m == "dcgan" else args.resolution for m in args.models}
    detector = next((m for m in args.models if m != "dcgan"), "resnet18")
    configs = grid(args)
    flops = {(c["model"], c["batch_size"]): None for c in configs}
    flops = {key: step_flops(key[0], key[1], size_of[key[0]], device) for key in flops}
    results = {"device": name, "flops_per_step": {f"{m}@{b}": f for (m, b), f in flops.items()}, "configs": [],
               "skipped": []}

    def run_config(config: dict) -> None:
        model, batch = config["model"], config["batch_size"]
        row = {**config, "resolution": size_of[model]}
        try:
            setup = Setup(model, batch, size_of[model], config["precision"], config["channels_last"],
                          config["compile"], device, config["cudnn_benchmark"])
            steps_per_s = time_steps(setup.run, device, args.warmup, args.steps, args.windows)
            peak = peak_tflops(name, config["precision"], args.peak_tflops)
            row |= {"images_per_s": steps_per_s * batch, "tflops": steps_per_s * flops[model, batch] / 1e12}
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
        results["loader_vs_model"] = [loader_vs_model(args, detector, w, augment == "on", nice, device, set_dir)
                                      for augment in args.loader_augment for nice in args.loader_nice
                                      for w in args.loader_workers]

    for config in configs:
        if config["compile"] and "loader_vs_model" not in results:
            check_loader()  # before the compiled configurations, which may not all fit
        reserve = 90 if config["compile"] else 10  # a compile takes tens of seconds and cannot be cut short
        if deadline - time.perf_counter() < reserve:
            results["skipped"].append(config)
            continue
        run_config(config)
    if "loader_vs_model" not in results and deadline - time.perf_counter() > 30:
        check_loader()

    results["bf16_vs_fp32"] = speedups(results["configs"], "bf16", "fp32")
    yes = {True: "yes", False: ""}
    rows = [[c["model"], c["batch_size"], c["precision"], yes[c["channels_last"]], c["compile"] or "",
             yes[c["cudnn_benchmark"]], c.get("images_per_s"), c.get("tflops"), c.get("mfu"), c.get("error", "")]
            for c in results["configs"]]
    print_table(f"gpu: {name}, training step (median of {args.windows} windows)",
                ["model", "batch", "dtype", "channels_last", "compile", "cudnn autotune", "images/s", "TFLOP/s", "MFU",
                 "error"], rows)
    if "loader_vs_model" in results:
        print_table(f"gpu: 64-px faces, loader against model ({detector}, bf16, channels_last)",
                    ["workers", "augment", "worker nice", "loader images/s", "model images/s", "together images/s",
                     "together / model", "data wait", "bound by"],
                    [[lm["workers"], yes[lm["augment"]], lm["worker_nice"], lm["loader_images_per_s"],
                      lm["model_images_per_s"], lm["together_images_per_s"], lm["together_vs_model"],
                      lm["data_wait_frac"], lm["bound_by"]] for lm in results["loader_vs_model"]])
    for pb in results.get("platform_vs_bare", []):
        console.print(f"platform step / bare step ({pb['model']}, {pb['resolution']} px, batch {pb['batch_size']}, "
                      f"bf16, {'channels_last' if pb['channels_last'] else 'contiguous'}): "
                      f"{pb['platform_vs_bare']:.3f} (bare with a fused optimizer: {pb['platform_vs_bare_fused']:.3f}); "
                      f"host waits: platform {pb['platform_host_waits']}, bare {pb['bare_host_waits']}")
    for sp in results["bf16_vs_fp32"]:
        console.print(f"bf16 / fp32 ({sp['model']}, batch {sp['batch_size']}, "
                      f"{'channels_last' if sp['channels_last'] else 'contiguous'}, compile {sp['compile'] or 'off'}, "
                      f"cudnn autotune {'on' if sp['cudnn_benchmark'] else 'off'}): {sp['ratio']:.2f}x")
    if results["skipped"]:
        console.print(f"skipped for the budget: {len(results['skipped'])} configuration(s)")
    write_result("gpu", args, results, started)
    return results


if __name__ == "__main__":
    main()
