"""Synthesis: an exported generator -> exactly N fake faces, as a shard set or as PNG files.

Image ``i`` depends only on (seed, i): its starting noise (a GAN's latent, a diffusion model's
noise image) comes from its own seeded generator, and every generator maps noise to an image
without randomness of its own, so the output is the same whatever the number of ranks or the
batch size, and ranks never need to talk. One ``Synthesizer`` per kind of generator (its
``synthesis``) says how noise becomes images and which options (truncation, steps) it takes.
Keys are ``<run>-<i>``; every sample has ``cls`` 1 and a json naming the generator model, its run
and step, the index, the seed and the options used.

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
from deepfake_dist.registry import Registry
from deepfake_dist.tasks.generative import EXPORT_NAME

FORMATS = ("shards", "png")


def run_name(info: dict, weights: Path) -> str:
    """The generator's run name, filesystem-safe (keys are ``[A-Za-z0-9_-]``)."""
    name = info.get("config", {}).get("name") or weights.parent.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "generator"


def noise(index: int, shape: int | tuple[int, ...], seed: int, truncation: float | None = None) -> torch.Tensor:
    """Image ``index``'s starting noise: N(0, I), or truncated to [-T, T] (the truncation trick)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if truncation:
        return torch.nn.init.trunc_normal_(torch.empty(shape), 0.0, 1.0, -truncation, truncation, generator=g)
    return torch.randn(shape, generator=g)


SYNTHESIZERS = Registry("synthesizer")  # by the exported generator's ``synthesis`` (GenerativeTask.synthesis)


class Synthesizer:
    """Makes images by index with an exported generator, ``batch_size`` at a time; what differs
    between generators is how a batch of indices becomes images (``render``). Conditional
    generators get the class ``index % num_classes``, so the classes are balanced."""

    options: tuple[str, ...] = ()  # which of GenerateOptions' truncation and steps this generator takes

    def __init__(self, model: torch.nn.Module, info: dict, device, opts: GenerateOptions):
        self.model, self.info, self.device = model.to(device).eval(), info, device
        self.opts, self.batch_size = opts, opts.batch_size
        self.num_classes = int(info.get("num_classes") or 0)
        self.channels = int(info["build_args"]["channels"])
        self.mode = "L" if self.channels == 1 else "RGB"
        self.order: list[int] = []
        self.cache: dict[int, Image.Image] = {}

    def label(self, index: int) -> int | None:
        return index % self.num_classes if self.num_classes else None

    def render(self, indices: Sequence[int]) -> torch.Tensor:
        """Images in about [-1, 1] (B, channels, res, res) for ``indices``."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """The options that shaped the images, for the manifest (and, those set, each sample's json)."""
        return {"truncation": self.opts.truncation}

    @torch.no_grad()
    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        out = self.render(indices)
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


@SYNTHESIZERS.register("latent")
class LatentSynthesizer(Synthesizer):
    """A GAN's generator takes (z, labels); an autoencoder decodes prior draws (``from_noise``).
    ``truncation`` T: latents are drawn from N(0, I) truncated to [-T, T]."""

    options = ("truncation",)

    def render(self, indices: Sequence[int]) -> torch.Tensor:
        dim = self.model.latent_dim if hasattr(self.model, "from_noise") else self.model.z_dim
        z = torch.stack([noise(i, dim, self.opts.seed, self.opts.truncation) for i in indices]).to(self.device)
        if hasattr(self.model, "from_noise"):
            return self.model.from_noise(z)
        labels = torch.tensor([self.label(i) for i in indices], device=self.device) if self.num_classes else None
        return self.model(z, labels)


@SYNTHESIZERS.register("style")
class StyleSynthesizer(Synthesizer):
    """A style-based generator (StyleGAN2) with its fixed noise inputs. ``truncation`` psi pulls
    each w towards the average w tracked in training: w_avg + psi (w - w_avg); 1 is none."""

    options = ("truncation",)

    def render(self, indices: Sequence[int]) -> torch.Tensor:
        z = torch.stack([noise(i, self.model.z_dim, self.opts.seed) for i in indices]).to(self.device)
        return self.model(z, truncation=self.opts.truncation or 1.0)


@SYNTHESIZERS.register("diffusion")
class DiffusionSynthesizer(Synthesizer):
    """A diffusion model denoises each image's own starting noise in ``steps`` steps of the run's
    sampler (deterministic: the image depends on its noise only)."""

    options = ("steps",)

    def render(self, indices: Sequence[int]) -> torch.Tensor:
        size = int(self.info["resolution"])
        x = torch.stack([noise(i, (self.channels, size, size), self.opts.seed) for i in indices]).to(self.device)
        return self.model.sample(x, self.steps(), self.info["sampler"])

    def steps(self) -> int:
        return self.opts.steps or int(self.info["sample_steps"])

    def record(self) -> dict[str, Any]:
        return {"steps": self.steps(), "sampler": self.info["sampler"]}


def synthesizer(model: torch.nn.Module, info: dict, device, opts: GenerateOptions) -> Synthesizer:
    """The synthesizer for this exported generator; an option it does not take is an error."""
    cls = SYNTHESIZERS.get(info.get("synthesis", "latent"))
    for name, flag in (("truncation", "--truncation"), ("steps", "--steps")):
        if getattr(opts, name) is not None and name not in cls.options:
            raise UserError(f"{flag} does not apply to {opts.checkpoint}: it holds a {info['model']} generator "
                            f"({info.get('synthesis', 'latent')} synthesis, which takes {', '.join(cls.options)})")
    return cls(model, info, device, opts)


def _check(opts: GenerateOptions) -> None:
    counts = {"--num-images": opts.num_images, "--batch-size": opts.batch_size}
    if opts.steps is not None:
        counts["--steps"] = opts.steps
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} {value}: expected an integer >= 1")
    if opts.truncation is not None and not opts.truncation > 0:
        raise UserError(f"--truncation {opts.truncation}: expected a positive number (latent generators: standard "
                        "deviations, e.g. 1.5; StyleGAN2: psi, e.g. 0.7)")
    if opts.format not in FORMATS:
        raise UserError(f"--format {opts.format}: expected one of {', '.join(FORMATS)}")


def generate(opts: GenerateOptions, *, command: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write exactly ``opts.num_images`` fakes from ``opts.checkpoint`` (a run folder or a
    ``generator.safetensors``): a shard set in ``out`` (``format="shards"``; returns its
    manifest) or ``<key>.png`` files in ``output_dir`` (or ``out``) (``format="png"``; returns
    ``{"out", "images", "keys"}``). ``truncation`` applies to latent and style generators,
    ``steps`` to diffusion ones. Call it on every rank: each makes its share. ``command`` is
    recorded in the manifest (default: the equivalent ``deepfake-dist generate`` command).
    Raises ``UserError`` for bad input."""
    checkpoint, num_images, seed = opts.checkpoint, opts.num_images, opts.seed
    target = opts.output_dir if opts.format == "png" and opts.output_dir else opts.out
    if target is None:
        raise UserError("--out is required (a shard set folder, e.g. shards/lfw-dcgan-fake), or --output_dir with "
                        "--format png")
    _check(opts)
    weights, _ = resolve(checkpoint, EXPORT_NAME)
    model, info = load_exported(checkpoint, EXPORT_NAME)
    state = distributed_state()
    synth = synthesizer(model, info, state.device, opts)
    run = run_name(info, weights)
    width = max(6, len(str(num_images - 1)))
    keys = [f"{run}-{i:0{width}d}" for i in range(num_images)]
    command = command or command_line("generate", replace(opts, overwrite=False))
    if opts.format == "png":
        return _write_pngs(synth, keys, Path(target), state)

    fractions = parse_split(opts.split)
    writer = ShardSetWriter(target, opts.overwrite, state)
    meta = {"source": "generator", "label": "fake", "generator": info["model"], "run": run,
            "step": info.get("step"), "seed": seed, **{k: v for k, v in synth.record().items() if v is not None}}
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
                          "seed": seed, **synth.record(), "num_images": num_images},
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
