"""Synthesis: an exported generator -> exactly N fake faces, as a shard set or as PNG files.

Image ``i`` depends only on (seed, i): its noise comes from its own seeded generator, so the
output is the same whatever the number of ranks or the batch size, and ranks never need to
talk. Keys are ``<run>-<i>``; every sample has ``cls`` 1 and a json naming the generator
model, its run and step, the index and the seed.

Shards go through the same planner and writer as ``prepare`` (``data.shard_writer``): the N items
are split train/val/test by fractions, cut into shards, each rank writes a contiguous run of
the planned shards, and the main process publishes them with a manifest like a real set's.
Within a rank, images are generated ``batch_size`` at a time in the order the writer asks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deepfake_dist.atomic import atomic_path
from deepfake_dist.data.common import LABELS, Item
from deepfake_dist.data.manifest import file_sha256
from deepfake_dist.data.shard_writer import Encoding, ShardSetWriter, created_info, parse_split, plan_shards
from deepfake_dist.engine.distributed import distributed_state
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.models.exported import load_exported, resolve
from deepfake_dist.options import GenerateOptions, command_line
from deepfake_dist.tasks.generative import EXPORT_NAME

FORMATS = ("shards", "png")


def run_name(info: dict, weights: Path) -> str:
    """The generator's run name, filesystem-safe (keys are ``[A-Za-z0-9_-]``)."""
    name = info.get("config", {}).get("name") or weights.parent.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "generator"


def noise(index: int, dim: int, seed: int, truncation: float | None) -> torch.Tensor:
    """Image ``index``'s latent: N(0, I), or truncated to [-T, T] (the truncation trick)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if truncation:
        return torch.nn.init.trunc_normal_(torch.empty(dim), 0.0, 1.0, -truncation, truncation, generator=g)
    return torch.randn(dim, generator=g)


class Synthesizer:
    """Makes images by index with an exported generator: a GAN's generator takes (z, labels),
    an autoencoder decodes prior draws (``from_noise``). Conditional generators get the class
    ``index % num_classes``, so the classes are balanced."""

    def __init__(self, model: torch.nn.Module, info: dict, device, seed: int, truncation: float | None,
                 batch_size: int):
        self.model, self.device = model.to(device).eval(), device
        self.seed, self.truncation, self.batch_size = seed, truncation, batch_size
        self.num_classes = int(info.get("num_classes") or 0)
        self.dim = model.latent_dim if hasattr(model, "from_noise") else model.z_dim
        self.mode = "L" if int(info["build_args"]["channels"]) == 1 else "RGB"
        self.order: list[int] = []
        self.cache: dict[int, Image.Image] = {}

    def label(self, index: int) -> int | None:
        return index % self.num_classes if self.num_classes else None

    @torch.no_grad()
    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        z = torch.stack([noise(i, self.dim, self.seed, self.truncation) for i in indices]).to(self.device)
        if hasattr(self.model, "from_noise"):
            out = self.model.from_noise(z)
        else:
            labels = torch.tensor([self.label(i) for i in indices], device=self.device) if self.num_classes else None
            out = self.model(z, labels)
        pixels = ((out.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p[:, :, 0] if self.mode == "L" else p, self.mode) for p in pixels]

    def expect(self, order: list[int]) -> None:
        """The indices in the order they will be asked for (so they can be made in batches)."""
        self.order, self.position = order, {index: pos for pos, index in enumerate(order)}

    def image(self, index: int) -> Image.Image:
        if index not in self.cache:
            start = self.position[index]
            batch = self.order[start:start + self.batch_size]
            self.cache = dict(zip(batch, self.images(batch)))
        return self.cache.pop(index)


def _check(num_images: int, batch_size: int, truncation: float | None, fmt: str) -> None:
    for name, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} {value}: expected an integer >= 1")
    if truncation is not None and not truncation > 0:
        raise UserError(f"--truncation {truncation}: expected a positive number of standard deviations, e.g. 1.5")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


def generate(opts: GenerateOptions, *, command: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write exactly ``opts.num_images`` fakes from ``opts.checkpoint`` (a run folder or a
    ``generator.safetensors``): a shard set in ``out`` (``format="shards"``; returns its
    manifest) or ``<key>.png`` files in ``output_dir`` (or ``out``) (``format="png"``; returns
    ``{"out", "images", "keys"}``). Call it on every rank: each makes its share. ``command`` is
    recorded in the manifest (default: the equivalent ``deepfake-dist generate`` command).
    Raises ``UserError`` for bad input."""
    checkpoint, num_images, seed, truncation = opts.checkpoint, opts.num_images, opts.seed, opts.truncation
    target = opts.output_dir if opts.format == "png" and opts.output_dir else opts.out
    if target is None:
        raise UserError("--out is required (a shard set folder, e.g. shards/lfw-dcgan-fake), or --output_dir with "
                        "--format png")
    _check(num_images, opts.batch_size, truncation, opts.format)
    weights, _ = resolve(checkpoint, EXPORT_NAME)
    model, info = load_exported(checkpoint, EXPORT_NAME)
    state = distributed_state()
    synth = Synthesizer(model, info, state.device, seed, truncation, opts.batch_size)
    run = run_name(info, weights)
    width = max(6, len(str(num_images - 1)))
    keys = [f"{run}-{i:0{width}d}" for i in range(num_images)]
    command = command or command_line("generate", replace(opts, overwrite=False))
    if opts.format == "png":
        return _write_pngs(synth, keys, Path(target), state)

    fractions = parse_split(opts.split)
    writer = ShardSetWriter(target, opts.overwrite, state)
    meta = {"source": "generator", "label": "fake", "generator": info["model"], "run": run,
            "step": info.get("step"), "seed": seed, **({"truncation": truncation} if truncation else {})}
    items = [Item(key, None, LABELS["fake"], partial(synth.image, i), {**meta, "index": i, **_class(synth, i, info)},
                  f"{run}#{i}") for i, key in enumerate(keys)]
    jobs = writer.jobs(plan_shards(items, fractions, seed, opts.shard_size),
                       Encoding(synth.mode, int(info["resolution"]), opts.encoding, 95))
    synth.expect([item.meta["index"] for job in jobs for plan in job.shards for item in plan.items])
    writer.write(jobs, progress)
    fields = None
    if state.is_main_process:
        fields = {
            "name": writer.name,
            "source": f"generator:{checkpoint}",
            "resolution": int(info["resolution"]),
            "format": opts.encoding,
            "channels": 1 if synth.mode == "L" else 3,
            "mode": synth.mode,
            "frames": None,
            "preprocessing": {"crop": "none (generated at this resolution)", "resize_filter": "none"},
            "generator": {"model": info["model"], "run": run, "step": info.get("step"), "weights": str(weights),
                          "weights_sha256": file_sha256(weights), "manifests": info.get("manifests", {}),
                          "seed": seed, "truncation": truncation, "num_images": num_images},
            "split": {"fractions": list(fractions), "seed": seed, "assigned_by_fractions": num_images},
            "shard_size": opts.shard_size,
            "label": "fake",
            "created": created_info(command, 1, state.num_processes),
        }
    return writer.finish(fields, [], num_images)


def _class(synth: Synthesizer, index: int, info: dict) -> dict:
    label = synth.label(index)
    return {} if label is None else {"class": label, "condition": info.get("condition")}


def _write_pngs(synth: Synthesizer, keys: list[str], out: Path, state) -> dict[str, Any]:
    """Rank r writes the contiguous indices [r*N/W, (r+1)*N/W), each file atomically."""
    n, world, rank = len(keys), state.num_processes, state.process_index
    out.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank * n // world, (rank + 1) * n // world))
    for start in range(0, len(mine), synth.batch_size):
        batch = mine[start:start + synth.batch_size]
        for index, image in zip(batch, synth.images(batch)):
            with out_of_space_is_one_line(f"the image {out / keys[index]}.png", out, OUTPUTS_WHOLE), \
                    atomic_path(out / f"{keys[index]}.png") as tmp:
                image.save(tmp)
    state.wait_for_everyone()
    return {"out": str(out), "images": n, "keys": [keys[0], keys[-1]]}
