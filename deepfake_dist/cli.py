"""The ``deepfake-dist`` command line (also ``python -m deepfake_dist`` and ``launch/train.py``).

Each subcommand is a row of ``COMMANDS``: its options dataclass (``deepfake_dist.options``, from
which its flags are built), the function that runs it, and its help. A ``UserError`` anywhere is
printed as one line and exits with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rich.markup import escape

from deepfake_dist import __version__
from deepfake_dist.console import console as err
from deepfake_dist.console import results as out
from deepfake_dist.engine.distributed import close_process_group, distributed_state, exit_process
from deepfake_dist.errors import GroupFailure, UserError
from deepfake_dist.options import (
    BenchOptions,
    CompressOptions,
    CrossDatasetOptions,
    EvaluateOptions,
    ExplainOptions,
    ExportOptions,
    GenerateOptions,
    MatrixOptions,
    PredictOptions,
    PrepareOptions,
    RunOptions,
    ServeOptions,
    ShardsOptions,
    TrainOptions,
    default_of,
    flag_names,
)


def _command_line() -> str:
    return shlex.join(["deepfake-dist", *sys.argv[1:]])


def cmd_train(opts: TrainOptions) -> int:
    from deepfake_dist.config import parse_config, read_yaml
    from deepfake_dist.pipeline import experiment_kind, parse_pipeline, run_pipeline

    raw = read_yaml(opts.config)
    given = [f for f in dataclasses.fields(opts) if f.metadata["sets"] and getattr(opts, f.name) is not None]
    if experiment_kind(raw, opts.config) == "pipeline":  # its stages in order (train and the rest)
        if given:
            raise UserError(f"{flag_names(given[0])[0]} applies to one training config; {opts.config} is a pipeline: "
                            "set it in its stages or vars (e.g. vars.NAME=VALUE)")
        return run_pipeline(parse_pipeline(raw, opts.config, opts.overrides))
    flags = [f"{f.metadata['sets']}={getattr(opts, f.name)}" for f in given]
    cfg = parse_config(raw, opts.config, [*opts.overrides, *flags])
    from deepfake_dist.train.loop import train

    summary = train(cfg)
    return 3 if summary.get("stopped") else 0


def cmd_run(opts: RunOptions) -> int:
    from deepfake_dist.config import read_yaml
    from deepfake_dist.pipeline import experiment_kind, parse_pipeline, run_pipeline

    raw = read_yaml(opts.pipeline)
    if experiment_kind(raw, opts.pipeline) != "pipeline":
        raise UserError(f"{opts.pipeline}: a training config, not a pipeline (it has no 'stages:' list); "
                        f"train it with deepfake-dist train --config {opts.pipeline}")
    return run_pipeline(parse_pipeline(raw, opts.pipeline, opts.overrides))


def cmd_prepare(opts: PrepareOptions) -> int:
    from deepfake_dist.data.manifest import info_table
    from deepfake_dist.data.prepare import prepare

    manifest = prepare(opts, command=_command_line(), progress=True)
    if distributed_state().is_main_process:
        out.print(info_table(manifest))
    return 0


def _add_source_options(p: argparse.ArgumentParser) -> None:
    """The source kinds' own flags, gathered into ``PrepareOptions.options`` (unset: None)."""
    from deepfake_dist.data.sources import OPTION_GROUPS

    for cls, title in OPTION_GROUPS:
        group = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            shown = f" (default {f.default})" if f.default not in (None, False) else ""
            kind = _base_type(hints[f.name])
            kwargs = {"action": "store_true"} if kind is bool else {"type": kind, "choices": f.metadata["choices"],
                                                                    "metavar": f.name.upper()}
            group.add_argument(*flag_names(f), dest=f"options.{f.name}", default=None,
                               help=f.metadata["help"] + shown, **kwargs)


def cmd_shards(opts: ShardsOptions) -> int:
    from deepfake_dist.data.manifest import info_table, load_manifest, verify

    if opts.action == "index":
        return _shards_index(opts)
    if opts.action == "info":
        out.print(info_table(load_manifest(opts.set)))
        return 0
    problems = verify(opts.set)
    for problem in problems:
        err.print(f"[red]FAIL[/red] {escape(problem)}")
    if problems:
        err.print(f"{opts.set}: {len(problems)} problem(s); re-create the set with deepfake-dist prepare --overwrite")
        return 1
    out.print(f"{opts.set}: all shards match the manifest")
    return 0


def cmd_generate(opts: GenerateOptions) -> int:
    from deepfake_dist.data.manifest import info_table
    from deepfake_dist.generate import generate

    result = generate(opts, command=_command_line(), progress=True)
    if distributed_state().is_main_process:
        if opts.format == "png":
            first, last = result["keys"]
            out.print(f"{result['images']} images written to {escape(result['out'])} ({first} .. {last})")
        else:
            out.print(info_table(result))
    return 0


def _shards_index(opts: ShardsOptions) -> int:
    from deepfake_dist.data.index import index_set
    from deepfake_dist.data.manifest import info_table

    manifest = index_set(opts.set, opts.label_key, opts.label_from_path, opts.split_from_name, _command_line())
    out.print(info_table(manifest))
    for entry in manifest["unusable"][:20]:
        err.print(f"[yellow]unusable[/yellow] {escape(entry['shard'])}: {escape(entry['key'])}: {escape(entry['reason'])}")
    if len(manifest["unusable"]) > 20:
        err.print(f"... and {len(manifest['unusable']) - 20} more, listed in the manifest's unusable")
    return 0


def cmd_evaluate(opts: EvaluateOptions) -> int:
    from deepfake_dist.evaluation import evaluate

    evaluate(opts, command=_command_line())
    return 0


def cmd_cross_dataset(opts: CrossDatasetOptions) -> int:
    from deepfake_dist.evaluation.cross_dataset import cross_dataset

    cross_dataset(opts, command=_command_line())
    return 0


def cmd_matrix(opts: MatrixOptions) -> int:
    from deepfake_dist.pipeline import matrix_pipeline, run_pipeline

    return run_pipeline(matrix_pipeline(opts))


def cmd_predict(opts: PredictOptions) -> int:
    from deepfake_dist.atomic import json_text
    from deepfake_dist.deploy.predict import rows_table, score_files

    rows = score_files(opts)
    if opts.json:
        print(json_text(rows, indent=1))
    else:
        out.print(rows_table(rows))
    return 1 if any(r.get("error") for r in rows) else 0


def cmd_explain(opts: ExplainOptions) -> int:
    from deepfake_dist.deploy.predict import explain_files

    for row in explain_files(opts):
        out.print(f"{escape(row['path'])}: p(fake) {row['probability']:.4f} ({row['verdict']}) -> {escape(row['overlay'])}")
    return 0


def cmd_compress(opts: CompressOptions) -> int:
    from deepfake_dist.deploy.compress import compress, rich_table

    report = compress(opts)
    out.print(rich_table(report["rows"]))
    out.print(f"written to {escape(str(opts.out))}: compress.json, compress.md and the compressed model(s)")
    return 0


def cmd_export(opts: ExportOptions) -> int:
    from deepfake_dist.deploy.onnx_export import export_onnx

    meta = export_onnx(opts)
    parity = meta["parity"]
    out.print(f"{escape(str(opts.onnx))}: opset {meta['opset']}, dynamic batch; max |ONNX - PyTorch| = "
              f"{parity['max_abs_diff']:.2e} on {parity['images']} images ({escape(parity['source'])})")
    return 0


def cmd_serve(opts: ServeOptions) -> int:
    from deepfake_dist.serve.app import serve

    serve(opts)
    return 0


# Benchmarks are not part of the installed package: they live in the source checkout beside it
# (the editable install ``pip install -e .`` that a benchmark run needs anyway).
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(opts: BenchOptions) -> int:
    import runpy

    from deepfake_dist.registry import closest

    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))
    if not names:
        raise UserError(f"no benchmarks in {BENCHMARKS}; they live in the source checkout: run deepfake-dist bench "
                        "from a git clone installed with pip install -e .")
    if opts.name not in names:
        raise UserError(f"bench {opts.name}: no such benchmark{closest(opts.name, names)}; choose one of "
                        f"{', '.join(names)}")
    sys.path.insert(0, str(BENCHMARKS.parent))
    sys.argv = [f"deepfake-dist bench {opts.name}", *opts.args]
    runpy.run_module(f"benchmarks.{opts.name}", run_name="__main__", alter_sys=True)
    return 0


class Command(NamedTuple):
    options: type  # the options dataclass its flags are built from
    run: Callable[[Any], int]  # takes an instance of it, returns the exit status
    help: str
    extra: Callable[[argparse.ArgumentParser], None] | None = None  # flags beyond the dataclass's


COMMANDS = {
    "train": Command(TrainOptions, cmd_train, "train a model from a YAML config, or run a pipeline (any launch mode)"),
    "run": Command(RunOptions, cmd_run, "run a pipeline: its stages in order, the finished ones skipped (any launch mode)"),
    "prepare": Command(PrepareOptions, cmd_prepare, "turn a face dataset into WebDataset shards with a manifest",
                       _add_source_options),
    "generate": Command(GenerateOptions, cmd_generate, "write N fakes from a trained generator as a shard set or PNG "
                                                       "files (split over ranks under accelerate launch)"),
    "shards": Command(ShardsOptions, cmd_shards, "check, describe or index a shard set"),
    "evaluate": Command(EvaluateOptions, cmd_evaluate, "metrics, per-source, calibration, robustness, Grad-CAM and a "
                                                       "report for one or more detectors (any launch mode)"),
    "cross-dataset": Command(CrossDatasetOptions, cmd_cross_dataset, "frame and video AUC of detectors on each test "
                                                                     "set, beside DeepfakeBench's published table"),
    "matrix": Command(MatrixOptions, cmd_matrix, "the cross-generator matrix: a detector per fake set (and one on all), "
                                                 "each tested on every generator (any launch mode)"),
    "predict": Command(PredictOptions, cmd_predict, "score image files, folders and videos; one row per file "
                                                    "(exit status 1 when a file could not be scored)"),
    "explain": Command(ExplainOptions, cmd_explain, "Grad-CAM overlays for any images"),
    "compress": Command(CompressOptions, cmd_compress, "prune / fine-tune / int8-quantize a detector; table of size, "
                                                       "speed, accuracy"),
    "export": Command(ExportOptions, cmd_export, "export a detector to ONNX, checked against PyTorch with onnxruntime"),
    "serve": Command(ServeOptions, cmd_serve, "HTTP API + web page for a detector (FastAPI + uvicorn)"),
    "bench": Command(BenchOptions, cmd_bench, "run a benchmark from the checkout's benchmarks/ folder (see BENCHMARKS.md)"),
}


def _base_type(hint: Any) -> Any:
    """``int`` for ``int``, ``Optional[int]`` and ``list[int]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not None else hint


def _add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """A flag (or positional) per field of ``cls`` that the command line takes."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, default = f.metadata, default_of(f)
        if not meta["cli"]:
            continue
        required = default is dataclasses.MISSING
        kind = meta["type"] or _base_type(hints[f.name])
        if kind is bool:
            kwargs: dict[str, Any] = {"action": "store_false" if default else "store_true"}
        else:
            kwargs = {"type": kind, "choices": meta["choices"], "metavar": meta["metavar"]}
            if typing.get_origin(hints[f.name]) is list:
                kwargs["nargs"] = meta["nargs"] or ("+" if required else "*")
        if not required:
            kwargs["default"] = default
        if meta["positional"]:
            p.add_argument(f.name, help=meta["help"] or None, **kwargs)
        else:
            p.add_argument(*flag_names(f), dest=f.name, required=required, help=meta["help"] or None, **kwargs)


def options_from(args: argparse.Namespace, cls: type):
    """The options dataclass from parsed arguments; a dict field gathers the ``FIELD.KEY`` flags
    that were given."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata["cli"]:
            values[f.name] = getattr(args, f.name)
        else:
            prefix = f"{f.name}."
            values[f.name] = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    return cls(**values)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfake-dist", description="Distributed deepfake generation and detection.")
    p.add_argument("--version", action="version", version=f"deepfake-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help)
        _add_options(sp, command.options)
        if command.extra is not None:
            command.extra(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return command.run(options_from(args, command.options))
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
