"""DDP at 8, 64 and 256 GPUs, on paper: each detector's step time on one GPU (a bf16 training
step at 224 px, batch 256, channels_last, fused AdamW: measured on this machine's GPU with
``--measure``, or given as measured elsewhere with ``--images-per-s``) and its gradient size (its
parameter count, fp32 gradients as DDP reduces them), through NCCL's ring all-reduce at stated
bandwidths and latencies, give each model's scaling efficiency, and what the data path must then
feed each 8-GPU node: images/s, MB/s from object storage, and CPU cores for decode + augmentation.
The last two come from a real face photo (matplotlib's Grace Hopper sample) cropped to 224 px and
stored as JPEG (quality 95, as ``prepare --format jpg``): its size, and one core of this machine
decoding it and running the platform's training augmentation (``--bytes-per-image`` and
``--cpu-images-per-s`` give figures measured elsewhere instead).

Ring all-reduce of S bytes over N GPUs: 2 (N - 1) / N * S / bus bandwidth, plus 2 (N - 1) hops
of latency. DDP reduces gradients in 25 MB buckets while the backward pass runs, so the step hides
up to the backward's time (taken as 2/3 of the step) of it, except the last bucket, reduced once
the backward is done; efficiency is reported with and without that overlap.

    deepfake-dist bench projection --measure | --images-per-s resnet18=R hybrid=R efficientnet_b4=R
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import console, machine, parser, print_table, write_result

BATCH = 256
MODELS = ("resnet18", "hybrid", "efficientnet_b4")
BUCKET_MB = 25  # DDP's bucket_cap_mb
# (name, GPUs, bus bandwidth GB/s, latency per ring hop in us): NVLink inside one 8-GPU node;
# across nodes, 8 x 400 Gb/s InfiniBand per node (rail-optimised) or one 100 Gb/s Ethernet port
FABRICS = [("NVLink, 1 node", 8, 350.0, 5.0), ("IB 8x400G/node", 64, 200.0, 10.0), ("IB 8x400G/node", 256, 200.0, 10.0),
           ("100GbE/node", 64, 10.0, 20.0), ("100GbE/node", 256, 10.0, 20.0)]


def build(name: str) -> torch.nn.Module:
    if name == "efficientnet_b4":
        import timm

        return timm.create_model("efficientnet_b4", num_classes=1)
    from deepfake_dist.models import create_model

    return create_model(name)


def step_images_per_s(model: torch.nn.Module, windows: int = 3, steps: int = 10) -> float:
    """Images/s of a bare bf16 training step on the GPU: median of ``windows`` of ``steps``."""
    model = model.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(BATCH, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH,), device="cuda").float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(model(x).reshape(-1).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    rates = []
    for _ in range(windows):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rates.append(BATCH * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def face_jpeg() -> bytes:
    """A 224-px face crop as JPEG quality 95: what a training image in the shards looks like."""
    import io

    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        face = photo.convert("RGB").crop((110, 60, 410, 360)).resize((224, 224), Image.BICUBIC)
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def cpu_images_per_s(data: bytes, seconds: float = 5.0) -> float:
    """One core's rate of decode + the default training augmentation of ``data``, per CPU-second
    of this process on one thread (so other jobs on the machine do not lower it)."""
    from deepfake_dist.config import AugmentConfig
    from deepfake_dist.data.transforms import TrainAugment, decode

    torch.set_num_threads(1)
    augment, n, start = TrainAugment(224, AugmentConfig()), 0, time.process_time()
    while time.process_time() - start < seconds:
        augment(decode(data, 3))
        n += 1
    return n / (time.process_time() - start)


def allreduce_s(grad_bytes: float, gpus: int, bus_gb_s: float, hop_us: float) -> float:
    return 2 * (gpus - 1) / gpus * grad_bytes / (bus_gb_s * 1e9) + 2 * (gpus - 1) * hop_us * 1e-6


def main() -> None:
    p = parser("projection", __doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="time each model's step on this machine's GPU")
    p.add_argument("--images-per-s", dest="images_per_s", nargs="+", default=[], metavar="MODEL=RATE",
                   help="each model's step rate per GPU, measured elsewhere")
    p.add_argument("--bytes-per-image", dest="bytes_per_image", type=float,
                   help="a training image's size in the shards (default: the sample face's JPEG)")
    p.add_argument("--cpu-images-per-s", dest="cpu_images_per_s", type=float,
                   help="one CPU core's decode + augmentation rate at 224 px (default: measured here)")
    args = p.parse_args()
    data = face_jpeg()
    args.bytes_per_image = args.bytes_per_image or len(data)
    args.cpu_images_per_s = args.cpu_images_per_s or cpu_images_per_s(data)
    console.print(f"a 224-px face as JPEG: {args.bytes_per_image / 1e3:.1f} KB; decode + augmentation on one core: "
                  f"{args.cpu_images_per_s:,.0f} images/s")
    given = {name: float(rate) for name, rate in (item.split("=", 1) for item in args.images_per_s)}
    if not args.measure and set(given) != set(MODELS):
        raise SystemExit(f"give --measure (on a GPU) or --images-per-s for each of {', '.join(MODELS)}")
    started = machine()
    models = {}
    for name in MODELS:
        model = build(name)
        params = sum(t.numel() for t in model.parameters())
        rate = step_images_per_s(model) if args.measure else given[name]
        models[name] = {"parameters": params, "grad_mb": params * 4 / 1e6, "images_per_s_per_gpu": rate,
                        "step_ms": BATCH / rate * 1e3, "measured_here": args.measure}
        console.print(f"{name}: {params / 1e6:.2f} M parameters, {rate:,.0f} images/s per GPU, "
                      f"{models[name]['step_ms']:.1f} ms a step")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows = []
    for name, m in models.items():
        step = m["step_ms"] / 1e3
        for fabric, gpus, bus, hop in FABRICS:
            comm = allreduce_s(m["grad_mb"] * 1e6, gpus, bus, hop)
            exposed = max(comm - 2 / 3 * step, comm * min(1.0, BUCKET_MB / m["grad_mb"]))
            efficiency, overlapped = step / (step + comm), step / (step + exposed)
            per_node = 8 * m["images_per_s_per_gpu"] * overlapped
            rows.append({"model": name, "fabric": fabric, "gpus": gpus, "allreduce_ms": comm * 1e3,
                         "efficiency_no_overlap": efficiency, "efficiency_overlap": overlapped,
                         "node_images_per_s": per_node, "node_mb_per_s": per_node * args.bytes_per_image / 1e6,
                         "node_cpu_cores": per_node / args.cpu_images_per_s})
    print_table(f"DDP projection: bf16 step at 224 px, batch {BATCH} per GPU, fp32 gradients, ring all-reduce",
                ["model", "fabric", "GPUs", "all-reduce ms", "efficiency (no overlap)", "efficiency (overlap)",
                 "images/s per node", "MB/s per node", "CPU cores per node"],
                [[r["model"], r["fabric"], r["gpus"], r["allreduce_ms"], r["efficiency_no_overlap"],
                  r["efficiency_overlap"], r["node_images_per_s"], r["node_mb_per_s"], r["node_cpu_cores"]]
                 for r in rows])
    results = {"models": models, "fabrics": FABRICS, "batch": BATCH, "rows": rows}
    write_result("projection", args, results, started)


if __name__ == "__main__":
    main()
