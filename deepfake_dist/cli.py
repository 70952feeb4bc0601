"""The ``deepfake-dist`` command line (also ``python -m deepfake_dist`` and ``launch/train.py``).

Each subcommand is a small function registered in ``COMMANDS``; a ``UserError`` anywhere is
printed as one line and exits with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.markup import escape

from deepfake_dist import __version__
from deepfake_dist.engine.distributed import close_process_group, distributed_state, exit_process
from deepfake_dist.errors import GroupFailure, UserError

from deepfake_dist.console import console as err
from deepfake_dist.console import results as out


def _train_config(args):
    from deepfake_dist.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("epochs", "train.epochs"), ("batch_size", "data.batch_size"), ("lr", "optim.lr"),
                      ("name", "name"), ("output_dir", "output_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from deepfake_dist.pipeline import is_pipeline, run_pipeline

    if is_pipeline(args.config):  # a pipeline: its stages in order (train and the rest)
        flags = [f for f in ("epochs", "batch_size", "lr", "name", "output_dir") if getattr(args, f) is not None]
        if flags:
            raise UserError(f"--{flags[0].replace('_', '-')} applies to one training config; {args.config} is a "
                            "pipeline: set it in its stages or vars (e.g. vars.NAME=VALUE)")
        return run_pipeline(args.config, args.overrides)
    cfg = _train_config(args)
    from deepfake_dist.train.loop import train

    summary = train(cfg)
    return 3 if summary.get("stopped") else 0


def cmd_prepare(args) -> int:
    from deepfake_dist.data.manifest import info_table
    from deepfake_dist.data.prepare import prepare

    manifest = prepare(
        args.source, args.out, resolution=args.resolution, fmt=args.format, shard_size=args.shard_size,
        split=args.split, workers=args.workers, label=args.label, overwrite=args.overwrite, seed=args.seed,
        quality=args.quality, command=shlex.join(["deepfake-dist", *sys.argv[1:]]), progress=True,
        options={name: getattr(args, name) for name in _VIDEO_OPTIONS},
    )
    if distributed_state().is_main_process:
        out.print(info_table(manifest))
    return 0


def cmd_shards(args) -> int:
    from deepfake_dist.data.manifest import info_table, load_manifest, verify

    if args.action == "info":
        out.print(info_table(load_manifest(args.set)))
        return 0
    problems = verify(args.set)
    for problem in problems:
        err.print(f"[red]FAIL[/red] {escape(problem)}")
    if problems:
        err.print(f"{args.set}: {len(problems)} problem(s); re-create the set with deepfake-dist prepare --overwrite")
        return 1
    out.print(f"{args.set}: all shards match the manifest")
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train a model from a YAML config (any launch mode)")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/hybrid.yaml")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--name", help="run name (folder under output_dir)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config key")
    p.set_defaults(fn=cmd_train)


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="turn a face dataset into WebDataset shards with a manifest")
    p.add_argument("--source", required=True, help="builtin:lfw | celeba:PATH | folder:PATH | videos:PATH")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/lfw")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--format", choices=["jpg", "png"], default="png",
                   help="png (lossless) by default, so real and generated sets carry no compression difference")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000)
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions for unsplit sources")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--label", choices=["real", "fake"], help="label of a flat folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    from deepfake_dist.data.faces import VideoOptions

    d = VideoOptions()
    v = p.add_argument_group("videos:PATH (folders real/ fake/ of videos, or a CSV path,label,split)")
    v.add_argument("--frames", type=int, help=f"frames per clip (default {d.frames})")
    v.add_argument("--clips-per-video", dest="clips_per_video", type=int,
                   help=f"clips per video, fewer when it is short (default {d.clips_per_video})")
    v.add_argument("--sampling", choices=["step", "uniform"],
                   help=f"step: consecutive frames, every n-th; uniform: spread over the video (default {d.sampling})")
    v.add_argument("--frame-step", dest="frame_step", type=int, help=f"n for --sampling step (default {d.frame_step})")
    v.add_argument("--margin", type=float, help=f"face crop margin on each side, fraction of the box (default {d.margin})")
    v.add_argument("--face-model", dest="face_model", help="a local cv2.dnn SSD face detector (default: OpenCV's Haar cascade)")
    v.add_argument("--face-config", dest="face_config", help="its network description, e.g. deploy.prototxt for Caffe")
    v.add_argument("--frame-level", dest="frame_level", action="store_true", default=None,
                   help="one sample per frame (for image detectors) instead of one per clip")
    p.set_defaults(fn=cmd_prepare)


_VIDEO_OPTIONS = ("frames", "clips_per_video", "sampling", "frame_step", "margin", "face_model", "face_config", "frame_level")


def cmd_generate(args) -> int:
    from deepfake_dist.data.manifest import info_table
    from deepfake_dist.generate import generate

    target = args.output_dir if args.format == "png" and args.output_dir else args.out
    if target is None:
        raise UserError("--out is required (a shard set folder, e.g. shards/lfw-dcgan-fake), or --output_dir with --format png")
    result = generate(args.checkpoint, args.num_images, target, fmt=args.format, truncation=args.truncation,
                      seed=args.seed, batch_size=args.batch_size, split=args.split, shard_size=args.shard_size,
                      encoding=args.encoding, overwrite=args.overwrite, command=_command_line(), progress=True,
                      steps=args.steps)
    if distributed_state().is_main_process:
        if args.format == "png":
            first, last = result["keys"]
            out.print(f"{result['images']} images written to {escape(result['out'])} ({first} .. {last})")
        else:
            out.print(info_table(result))
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="write N fakes from a trained generator as a shard set or PNG files "
                                        "(split over ranks under accelerate launch)")
    p.add_argument("--checkpoint", required=True, help="generator run folder or generator.safetensors")
    p.add_argument("--num-images", dest="num_images", type=int, required=True, help="exactly this many, all ranks together")
    p.add_argument("--out", help="shard set folder, e.g. shards/lfw-dcgan-fake")
    p.add_argument("--format", choices=["shards", "png"], default="shards")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", help="folder for --format png")
    p.add_argument("--truncation", type=float, help="truncation trick: DCGAN/VAE latents resampled within +-T std; "
                   "StyleGAN2: psi, w pulled towards the average w (1: none, 0.7 usual)")
    p.add_argument("--steps", type=int, help="diffusion generators: denoising steps (default: the run's "
                   "diffusion.sample_steps)")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions of the shard set")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000)
    p.add_argument("--encoding", choices=["png", "jpg"], default="png", help="image format inside the shards")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_generate)


def _add_shards(sub):
    p = sub.add_parser("shards", help="check or describe a shard set")
    p.add_argument("action", choices=["verify", "info"])
    p.add_argument("set", help="shard set folder (holds manifest.json)")
    p.set_defaults(fn=cmd_shards)


def _command_line() -> str:
    return shlex.join(["deepfake-dist", *sys.argv[1:]])


def cmd_evaluate(args) -> int:
    from deepfake_dist.evaluation import evaluate

    evaluate(args.checkpoint, args.data, split=args.split, out=args.out, val_split=args.val_split,
             robustness=not args.no_robustness, explain=not args.no_explain, report=not args.no_report,
             batch_size=args.batch_size, layer=args.layer, num_workers=args.workers, command=_command_line(),
             video_aggregate=args.video_aggregate)
    return 0


def cmd_predict(args) -> int:
    from deepfake_dist.atomic import json_text
    from deepfake_dist.scoring import load_scorer, rows_table, score_files

    rows = score_files(load_scorer(args.checkpoint), args.paths, frames=args.frames, batch_size=args.batch_size)
    if args.json:
        print(json_text(rows, indent=1))
    else:
        out.print(rows_table(rows))
    return 1 if any(r.get("error") for r in rows) else 0


def cmd_explain(args) -> int:
    from deepfake_dist.scoring import explain_files, load_scorer

    for row in explain_files(load_scorer(args.checkpoint), args.images, args.out, layer=args.layer):
        out.print(f"{escape(row['path'])}: p(fake) {row['probability']:.4f} ({row['verdict']}) -> {escape(row['overlay'])}")
    return 0


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="metrics, per-source, calibration, robustness, Grad-CAM and a report "
                                        "for one or more detectors (any launch mode)")
    p.add_argument("--checkpoint", required=True, nargs="+", help="run folder(s) or model .safetensors file(s)")
    p.add_argument("--data", required=True, nargs="+", help="shard set folders, e.g. shards/real shards/fake")
    p.add_argument("--split", default="test", help="split to report on")
    p.add_argument("--val-split", dest="val_split", default="val",
                   help="split that picks the threshold and fits the temperature (never the reported split)")
    p.add_argument("--out", help="output folder (default RUN/eval-SPLIT for one checkpoint, else ./eval-SPLIT)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=1, help="data loader workers per process")
    p.add_argument("--layer", help="module for Grad-CAM and feature maps (default: each model's gradcam_layer)")
    p.add_argument("--no-robustness", dest="no_robustness", action="store_true", help="skip JPEG/blur/downscale runs")
    p.add_argument("--no-explain", dest="no_explain", action="store_true", help="skip Grad-CAM and feature maps")
    p.add_argument("--no-report", dest="no_report", action="store_true", help="skip index.html and report.md")
    p.add_argument("--video-aggregate", dest="video_aggregate", choices=["mean", "max", "median"], default="mean",
                   help="how a video's clip or frame scores pool into its video-level score")
    p.set_defaults(fn=cmd_evaluate)


def _add_predict(sub):
    p = sub.add_parser("predict", help="score image files, folders and videos; one row per file "
                                       "(exit status 1 when a file could not be scored)")
    p.add_argument("--checkpoint", required=True, help="run folder or model .safetensors file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, folders (searched recursively) or videos")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.set_defaults(fn=cmd_predict)


def _add_explain(sub):
    p = sub.add_parser("explain", help="Grad-CAM overlays for any images")
    p.add_argument("--checkpoint", required=True, help="run folder or model .safetensors file")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", default="explain", help="folder for the overlays")
    p.add_argument("--layer", help="module to explain (default: the model's gradcam_layer)")
    p.set_defaults(fn=cmd_explain)


def cmd_compress(args) -> int:
    from deepfake_dist.deploy.compress import compress, rich_table

    report = compress(args.checkpoint, args.out, prune=args.prune, structured=args.structured,
                      finetune_epochs=args.finetune_epochs, quantize=args.quantize,
                      calibration_batches=args.calibration_batches, overrides=args.overrides, threads=args.threads)
    out.print(rich_table(report["rows"]))
    out.print(f"written to {escape(str(args.out))}: compress.json, compress.md and the compressed model(s)")
    return 0


def cmd_export(args) -> int:
    from deepfake_dist.deploy.onnx_export import export_onnx

    meta = export_onnx(args.checkpoint, args.onnx, images=args.images, overrides=args.overrides, opset=args.opset)
    parity = meta["parity"]
    out.print(f"{escape(str(args.onnx))}: opset {meta['opset']}, dynamic batch; max |ONNX - PyTorch| = "
              f"{parity['max_abs_diff']:.2e} on {parity['images']} images ({escape(parity['source'])})")
    return 0


def cmd_serve(args) -> int:
    from deepfake_dist.serve.app import serve

    serve(args.checkpoint, onnx=args.onnx, host=args.host, port=args.port, token=args.token,
          token_file=args.token_file, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
          max_request_pixels=args.max_request_pixels, max_concurrent=args.max_concurrent,
          max_queue=args.max_queue, face_crop=args.face_crop)
    return 0


def _add_compress(sub):
    p = sub.add_parser("compress", help="prune / fine-tune / int8-quantize a detector; table of size, speed, accuracy")
    p.add_argument("--checkpoint", required=True, help="run folder or model .safetensors file")
    p.add_argument("--out", required=True, help="output folder for the compressed model(s) and the table")
    p.add_argument("--prune", type=float, default=0.0, help="fraction of weights to remove, e.g. 0.3")
    p.add_argument("--structured", action="store_true", help="remove whole conv output channels (L2 norm)")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=0,
                   help="fine-tune the pruned model with the normal trainer for N epochs")
    p.add_argument("--quantize", choices=["int8"], help="int8: static convolutions (calibrated), dynamic Linear/LSTM")
    p.add_argument("--calibration-batches", dest="calibration_batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency columns")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override the stored training config, e.g. data.train=[shards/lfw]")
    p.set_defaults(fn=cmd_compress)


def _add_export(sub):
    p = sub.add_parser("export", help="export a detector to ONNX, checked against PyTorch with onnxruntime")
    p.add_argument("--checkpoint", required=True, help="run folder or model .safetensors file")
    p.add_argument("--onnx", required=True, help="output file, e.g. runs/NAME/model.onnx (metadata: model.json)")
    p.add_argument("--images", help="folder of real images for the parity check (default: the test split)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override the stored training config")
    p.set_defaults(fn=cmd_export)


def _add_serve(sub):
    p = sub.add_parser("serve", help="HTTP API + web page for a detector (FastAPI + uvicorn)")
    p.add_argument("--checkpoint", required=True, help="run folder, model .safetensors or (with --onnx) .onnx file")
    p.add_argument("--onnx", action="store_true", help="score with ONNX Runtime (RUN/model.onnx or the .onnx given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1 endpoints (ps shows a command "
                   "line: prefer --token-file or the DEEPFAKE_DIST_TOKEN environment variable)")
    p.add_argument("--token-file", dest="token_file", help="read the token from the first line of this file")
    p.add_argument("--max-bytes", dest="max_bytes", type=int, default=10_000_000, help="largest upload per image")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, help="largest image (width x height) to decode; "
                   "default 40 million")
    p.add_argument("--max-request-pixels", dest="max_request_pixels", type=int,
                   help="most pixels all images of one request may hold; default --max-pixels")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int, default=2,
                   help="requests decoded and scored at once (each holds one decoded image)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=32,
                   help="requests waiting beyond those; more get 503 with Retry-After")
    p.add_argument("--face-crop", dest="face_crop", action="store_true",
                   help="detect the largest face (OpenCV Haar cascade) and score its crop")
    p.set_defaults(fn=cmd_serve)


# Benchmarks are not part of the installed package: they live in the source checkout beside it
# (the editable install ``pip install -e .`` that a benchmark run needs anyway).
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args) -> int:
    import runpy

    from deepfake_dist.registry import closest

    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))
    if not names:
        raise UserError(f"no benchmarks in {BENCHMARKS}; they live in the source checkout: run deepfake-dist bench "
                        "from a git clone installed with pip install -e .")
    if args.name not in names:
        raise UserError(f"bench {args.name}: no such benchmark{closest(args.name, names)}; choose one of "
                        f"{', '.join(names)}")
    sys.path.insert(0, str(BENCHMARKS.parent))
    sys.argv = [f"deepfake-dist bench {args.name}", *args.args]
    runpy.run_module(f"benchmarks.{args.name}", run_name="__main__", alter_sys=True)
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="run a benchmark from the checkout's benchmarks/ folder (see BENCHMARKS.md)")
    p.add_argument("name", help="loader | trainer | ddp | gpu | ... (benchmarks/NAME.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help lists them)")
    p.set_defaults(fn=cmd_bench)


COMMANDS = [_add_train, _add_prepare, _add_generate, _add_shards, _add_evaluate, _add_predict, _add_explain, _add_compress,
            _add_export, _add_serve, _add_bench]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-dist", description="Distributed deepfake generation and detection.")
    p.add_argument("--version", action="version", version=f"deepfake-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        return 2
    except GroupFailure as e:  # another rank died or stalled: one line naming it, not a traceback
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    finally:
        close_process_group()


def run() -> None:
    """The ``deepfake-dist`` command (and ``python -m deepfake_dist``)."""
    exit_process(main())
