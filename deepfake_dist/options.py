"""The options of every command, one dataclass per command: the one place where their names,
defaults and help are written.

``deepfake-dist COMMAND`` builds its flags from the dataclass (``cli``), the pipeline stage of
the same kind takes its fields as keys (``stage_keys``), and the library call takes the
dataclass itself (``prepare(PrepareOptions(source=..., out=...))``), so a default cannot differ
between the three. A field is declared with ``option``; its metadata says how it looks on the
command line (``flags``, default ``--name-with-dashes``; ``positional``; ``choices``) and whether
a pipeline stage takes it (``stage=False``: the stage sets it itself).
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from dataclasses import MISSING, dataclass
from typing import Any, Optional, Union

Split = Union[str, tuple[float, float, float]]  # "0.8,0.1,0.1" on the command line, a list in YAML


def option(default: Any = MISSING, help: str = "", *, flags: tuple[str, ...] = (), choices: tuple | None = None,
           positional: bool = False, metavar: str | None = None, nargs: str | None = None, type: Any = None,
           stage: bool = True, cli: bool = True, sets: str | None = None) -> Any:
    """A command option: ``default`` (none: required), its ``help``, and how the CLI spells it.
    ``type`` overrides the argparse type read from the annotation; ``sets`` names the training
    config key a ``train`` flag sets."""
    meta = {"help": help, "flags": flags, "choices": choices, "positional": positional, "metavar": metavar,
            "nargs": nargs, "type": type, "stage": stage, "cli": cli, "sets": sets}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default (a fresh one for lists and dicts), or ``MISSING`` when it is required."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def stage_keys(cls, also_required: tuple[str, ...] = ()) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``(required, optional)`` keys of the pipeline stage that runs this command: the fields a
    stage takes, required when they have no default or are in ``also_required``."""
    taken = [f for f in dataclasses.fields(cls) if f.metadata["stage"]]
    required = tuple(f.name for f in taken if default_of(f) is MISSING or f.name in also_required)
    return required, {f.name: default_of(f) for f in taken if f.name not in required}


def command_line(command: str, opts) -> str:
    """The ``deepfake-dist`` command that gives ``opts``: its required options and those that
    differ from their defaults (a dict field's items as flags of their own, as ``prepare``'s
    source options are)."""
    words = ["deepfake-dist", command]
    for f in dataclasses.fields(opts):
        value, default = getattr(opts, f.name), default_of(f)
        if default is MISSING or value != default:
            words += _words(f, value)
    return shlex.join(words)


def _words(f: dataclasses.Field, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [w for key, item in value.items() if item is not None and item is not False
                for w in [f"--{key.replace('_', '-')}"] + ([] if item is True else [str(item)])]
    if isinstance(value, (list, tuple)):
        items = [f"{v:g}" if isinstance(v, float) else str(v) for v in value]
        items = [",".join(items)] if f.metadata["type"] is str else items  # one word: "0.8,0.1,0.1"
    else:
        items = [] if isinstance(value, bool) or value is None else [str(value)]
    if f.metadata["positional"]:
        return items
    return [flag_names(f)[0], *items] if items or isinstance(value, bool) else []


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",)


@dataclass(kw_only=True)
class TrainOptions:
    config: str = option(help="experiment YAML, e.g. configs/hybrid.yaml (a pipeline runs as with deepfake-dist run)")
    epochs: Optional[int] = option(None, sets="train.epochs")
    batch_size: Optional[int] = option(None, "per process", sets="data.batch_size")
    lr: Optional[float] = option(None, sets="optim.lr")
    name: Optional[str] = option(None, "run name (folder under output_dir)", sets="name")
    output_dir: Optional[str] = option(None, sets="output_dir")
    overrides: list[str] = option([], "override any config key", positional=True, metavar="key.sub=value")


@dataclass(kw_only=True)
class RunOptions:
    pipeline: str = option(help="pipeline YAML (a top-level stages: list), e.g. configs/quickstart.yaml",
                           positional=True)
    overrides: list[str] = option([], "set a variable of the pipeline", positional=True, metavar="vars.NAME=VALUE")


@dataclass(kw_only=True)
class PrepareOptions:
    source: str = option(help="builtin:lfw | celeba:PATH | folder:PATH | videos:PATH | ffpp:PATH | celebdf:PATH | "
                              "dfdc:PATH | dfdcp:PATH | fakeavceleb:PATH")
    out: str = option(help="output folder or s3://bucket/prefix, e.g. shards/lfw")
    resolution: Optional[int] = option(None, "pixels (default 64; 256 for ffpp, celebdf, dfdc, dfdcp, fakeavceleb)")
    format: str = option("png", "png (lossless) by default, so real and generated sets carry no compression "
                                "difference", choices=("jpg", "png"))
    quality: int = option(95, "JPEG quality")
    shard_size: Optional[int] = option(None, "inputs (images, videos) per shard (default 1000; 32 videos for ffpp, celebdf, "
                                             "dfdc, dfdcp, fakeavceleb)")
    split: Split = option((0.8, 0.1, 0.1), "train,val,test fractions for unsplit sources", type=str)
    splits: Optional[Union[str, list[str]]] = option(None, "write only these splits, comma-separated (e.g. test, for a "
                                                           "set kept for testing); default all", type=str)
    workers: int = option(1)
    label: Optional[str] = option(None, "label of a flat folder", choices=("real", "fake"))
    seed: int = option(0)
    overwrite: bool = option(False, stage=False)
    options: dict[str, Any] = option({}, "the source kind's own options (videos: data.faces.VideoOptions)", cli=False)


@dataclass(kw_only=True)
class GenerateOptions:
    checkpoint: str = option(help="generator run folder or generator.safetensors")
    num_images: int = option(help="exactly this many, all ranks together")
    out: Optional[str] = option(None, "shard set folder or s3://bucket/prefix, e.g. shards/lfw-dcgan-fake")
    format: str = option("shards", choices=("shards", "png"), stage=False)
    output_dir: Optional[str] = option(None, "folder for --format png", flags=("--output_dir", "--output-dir"),
                                       stage=False)
    truncation: Optional[float] = option(None, "truncation trick: DCGAN/VAE latents resampled within +-T std; "
                                               "StyleGAN2: psi, w pulled towards the average w (1: none, 0.7 usual)")
    steps: Optional[int] = option(None, "diffusion generators: denoising steps (default: the run's "
                                        "diffusion.sample_steps)")
    seed: int = option(0, "image i depends only on (seed, i)")
    batch_size: int = option(64)
    split: Split = option((0.8, 0.1, 0.1), "train,val,test fractions of the shard set", type=str)
    shard_size: int = option(1000)
    encoding: str = option("png", "image format inside the shards", choices=("png", "jpg"))
    overwrite: bool = option(False, stage=False)


@dataclass(kw_only=True)
class ShardsOptions:
    action: str = option(choices=("verify", "info", "index"), positional=True)
    set: str = option(help="shard set: a folder, an http(s):// URL or s3://bucket/prefix (holds manifest.json)",
                      positional=True)
    label_key: Optional[str] = option(None, "index: the member holding the label (0/1 or real/fake; default cls), or "
                                            "json:FIELD for a field of the json member", metavar="KEY")
    label_from_path: Optional[str] = option(None, "index: a regular expression searched in each sample's key: its "
                                                  "group (?P<real>...) or (?P<fake>...) that matched, or its first "
                                                  "group read as 0/1/real/fake", metavar="PATTERN")
    split_from_name: bool = option(False, "index: each shard's split from its file name (train, val, valid, "
                                          "validation, test); otherwise every shard is train")


@dataclass(kw_only=True)
class EvaluateOptions:
    checkpoints: list[str] = option(help="run folder(s) or model .safetensors file(s)", flags=("--checkpoint",),
                                    metavar="CHECKPOINT")
    data: list[str] = option(help="shard set folders, e.g. shards/real shards/fake")
    split: str = option("test", "split to report on")
    val_split: str = option("val", "split that picks the threshold and fits the temperature (never the reported split)")
    out: Optional[str] = option(None, "output folder (default RUN/eval-SPLIT for one checkpoint, else ./eval-SPLIT)")
    batch_size: int = option(64, "per process")
    workers: int = option(1, "data loader workers per process")
    layer: Optional[str] = option(None, "module for Grad-CAM and feature maps (default: each model's gradcam_layer)")
    robustness: bool = option(True, "skip JPEG/blur/downscale runs", flags=("--no-robustness",))
    explain: bool = option(True, "skip Grad-CAM and feature maps", flags=("--no-explain",))
    report: bool = option(True, "skip index.html and report.md", flags=("--no-report",))
    video_aggregate: str = option("mean", "how a video's clip or frame scores pool into its video-level score",
                                  choices=("mean", "max", "median"))


@dataclass(kw_only=True)
class CrossDatasetOptions:
    checkpoints: list[str] = option(help="run folder(s) or model .safetensors file(s), a row each",
                                    flags=("--checkpoint",), metavar="CHECKPOINT")
    data: list[str] = option(help="test sets, a shard set folder each (real and fake videos), e.g. shards/ffpp-c23 "
                                  "shards/celebdf shards/dfdc shards/dfdcp")
    split: str = option("test", "split to score in every set")
    out: Optional[str] = option(None, "output folder (default RUN/cross-dataset for one checkpoint, else ./cross-dataset)")
    reference: Optional[str] = option(None, "DeepfakeBench's published row beside every checkpoint: xception or "
                                            "efficientnet_b4 (default: each checkpoint's own model, when published)")
    batch_size: int = option(64, "per process")
    workers: int = option(1, "data loader workers per process")


@dataclass(kw_only=True)
class MatrixOptions:
    real: str = option(help="shard set of real faces, e.g. shards/lfw")
    fakes: list[str] = option(help="two or more fake shard sets, one per generator, e.g. shards/lfw-dcgan-fake "
                                   "shards/lfw-vae-fake")
    model: Optional[str] = option(None, "detector: trains configs/MODEL.yaml (or give --config)")
    config: Optional[str] = option(None, "detector training config, instead of --model")
    out: Optional[str] = option(None, "output folder: the runs, the matrix and its report (default runs/matrix-MODEL)")
    seeds: list[int] = option([0], "train each detector once per seed; the matrix gives the mean and the spread")
    all: bool = option(True, "skip the detector trained on all fake sets", flags=("--no-all",))
    split: str = option("test", "split every detector is tested on (each picks its model on its own val split)")
    batch_size: int = option(64, "per process, when scoring")
    workers: int = option(0, "data loader workers per process, when scoring")
    overrides: list[str] = option([], "override a key of the training config for every run, e.g. train.epochs=3",
                                  positional=True, metavar="key.sub=value")


@dataclass(kw_only=True)
class PredictOptions:
    checkpoint: str = option(help="run folder or model .safetensors file")
    paths: list[str] = option(help="images, folders (searched recursively) or videos", positional=True, metavar="PATH")
    json: bool = option(False, "print the rows as JSON")
    frames: int = option(16, "frames sampled per video")
    batch_size: int = option(64)


@dataclass(kw_only=True)
class ExplainOptions:
    checkpoint: str = option(help="run folder or model .safetensors file")
    images: list[str] = option(help="image files or folders", positional=True, metavar="IMAGE")
    out: str = option("explain", "folder for the overlays")
    layer: Optional[str] = option(None, "module to explain (default: the model's gradcam_layer)")


@dataclass(kw_only=True)
class CompressOptions:
    checkpoint: str = option(help="run folder or model .safetensors file")
    out: str = option(help="output folder for the compressed model(s) and the table")
    prune: float = option(0.0, "fraction of weights to remove, e.g. 0.3")
    structured: bool = option(False, "remove whole conv output channels (L2 norm)")
    finetune_epochs: int = option(0, "fine-tune the pruned model with the normal trainer for N epochs")
    quantize: Optional[str] = option(None, "int8: static convolutions (calibrated), dynamic Linear/LSTM",
                                     choices=("int8",))
    calibration_batches: int = option(8)
    threads: int = option(1, "CPU threads for the latency columns")
    overrides: list[str] = option([], "override the stored training config, e.g. data.train=[shards/lfw]",
                                  positional=True, metavar="key.sub=value")


@dataclass(kw_only=True)
class ExportOptions:
    checkpoint: str = option(help="run folder or model .safetensors file")
    onnx: str = option(help="output file, e.g. runs/NAME/model.onnx (metadata: model.json)")
    images: Optional[str] = option(None, "folder of real images for the parity check (default: the test split)")
    opset: int = option(18)
    overrides: list[str] = option([], "override the stored training config", positional=True, metavar="key.sub=value")


@dataclass(kw_only=True)
class ServeOptions:
    checkpoint: str = option(help="run folder, model .safetensors or (with --onnx) .onnx file")
    onnx: bool = option(False, "score with ONNX Runtime (RUN/model.onnx or the .onnx given)")
    host: str = option("127.0.0.1")
    port: int = option(8000)
    token: Optional[str] = option(None, "require 'Authorization: Bearer TOKEN' on /v1 endpoints (ps shows a command "
                                        "line: prefer --token-file or the DEEPFAKE_DIST_TOKEN environment variable)")
    token_file: Optional[str] = option(None, "read the token from the first line of this file")
    max_bytes: int = option(10_000_000, "largest upload per image")
    max_pixels: Optional[int] = option(None, "largest image (width x height) to decode; default 40 million")
    max_request_pixels: Optional[int] = option(None, "most pixels all images of one request may hold; default "
                                                     "--max-pixels")
    max_concurrent: int = option(2, "requests decoded and scored at once (each holds one decoded image)")
    max_queue: int = option(32, "requests waiting beyond those; more get 503 with Retry-After")
    face_crop: bool = option(False, "detect the largest face (OpenCV Haar cascade) and score its crop")
    max_video_bytes: int = option(50_000_000, "largest video upload (a model that scores clips or their sound)")
    max_video_seconds: float = option(60.0, "longest video upload, read from its container before any frame is decoded")


@dataclass(kw_only=True)
class BenchOptions:
    name: str = option(help="loader | trainer | ddp | gpu | ... (benchmarks/NAME.py)", positional=True)
    args: list[str] = option([], "the benchmark's own options (NAME --help lists them)", positional=True,
                             nargs="...")
