"""A command's options are written once (``deepfake_dist.options``): the CLI's defaults, its
pipeline stage's and its library call's are the dataclass's, so none can drift from the others;
and every command line the README shows still parses."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import shlex
import typing
from pathlib import Path

import pytest

from deepfake_dist.cli import COMMANDS, options_from, parser
from deepfake_dist.options import GenerateOptions, PrepareOptions, command_line, default_of, flag_names
from deepfake_dist.pipeline import STAGES

README = Path(__file__).resolve().parents[1] / "README.md"
LIBRARY = {"prepare": ["data.prepare.prepare"], "generate": ["generate.generate"], "evaluate": ["evaluation.evaluate"],
           "cross-dataset": ["evaluation.cross_dataset.cross_dataset"],
           "predict": ["deploy.predict.score_files"], "explain": ["deploy.predict.explain_files"],
           "matrix": ["evaluation.matrix.plan", "evaluation.matrix.matrix"],
           "compress": ["deploy.compress.compress"], "export": ["deploy.onnx_export.export_onnx"],
           "serve": ["serve.app.create_app", "serve.app.serve"]}


def _required(cls) -> tuple[list[str], dict]:
    """Command-line words giving every required option of ``cls``, and the values they give."""
    hints = typing.get_type_hints(cls)
    words, values = [], {}
    for f in dataclasses.fields(cls):
        if default_of(f) is not dataclasses.MISSING:
            continue
        choices = f.metadata["choices"]
        value = choices[0] if choices else "3" if hints[f.name] is int else f"some-{f.name}"
        listed = typing.get_origin(hints[f.name]) is list
        words += ([] if f.metadata["positional"] else [flag_names(f)[0]]) + [value]
        values[f.name] = [value] if listed else int(value) if hints[f.name] is int else value
    return words, values


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_cli_defaults_are_the_options_defaults(name):
    cls = COMMANDS[name].options
    words, values = _required(cls)
    assert options_from(parser().parse_args([name, *words]), cls) == cls(**values)


@pytest.mark.parametrize("kind", [k for k in STAGES.names() if STAGES.get(k).options is not None])
def test_a_stage_takes_its_commands_options_with_their_defaults(kind):
    stage = STAGES.get(kind)
    cls = stage.options
    assert COMMANDS[kind].options is cls  # the stage runs the command of the same name
    _, values = _required(cls)
    spec = {**values, **{key: f"some-{key}" for key in stage.required if key not in values}}
    built = stage(spec, where=f"test ({kind})")
    taken = {f.name: default_of(f) for f in dataclasses.fields(cls) if f.metadata["stage"]}
    assert built.spec == {**taken, **spec}


def test_the_evaluate_stage_takes_every_evaluate_option():
    assert {"video_aggregate", "workers", "layer"} <= set(STAGES.get("evaluate").optional)


@pytest.mark.parametrize("name", list(LIBRARY))
def test_the_library_takes_the_options_and_no_default_of_its_own(name):
    cls = COMMANDS[name].options
    fields = {f.name for f in dataclasses.fields(cls)}
    for path in LIBRARY[name]:
        module, _, function = f"deepfake_dist.{path}".rpartition(".")
        fn = getattr(importlib.import_module(module), function)
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].annotation in (cls, cls.__name__), fn
        assert not fields & {p.name for p in params[1:]}, fn  # no second place for an option's default


def test_the_manifest_command_gives_the_same_options():
    opts = PrepareOptions(source="videos:v", out="shards/v", resolution=32, split=(0.6, 0.2, 0.2),
                          options={"frames": 4, "frame_level": True, "face_model": None})
    assert command_line("prepare", opts) == ("deepfake-dist prepare --source videos:v --out shards/v --resolution 32 "
                                             "--split 0.6,0.2,0.2 --frames 4 --frame-level")
    args = parser().parse_args(shlex.split(command_line("prepare", opts))[1:])
    parsed = dataclasses.replace(opts, split="0.6,0.2,0.2", options={"frames": 4, "frame_level": True})
    assert options_from(args, PrepareOptions) == parsed
    png = GenerateOptions(checkpoint="runs/dcgan", num_images=8, format="png", output_dir="samples")
    assert command_line("generate", png) == ("deepfake-dist generate --checkpoint runs/dcgan --num-images 8 "
                                             "--format png --output_dir samples")


def _readme_commands() -> list[str]:
    """The ``deepfake-dist`` lines of the README's code blocks: continuation lines joined,
    comments dropped, ``[--flag VALUE]`` kept as given and ``a|b`` as its first choice."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line.strip())
        if line.startswith("deepfake-dist "):
            line = re.sub(r"\[([^\]]*)\]", r"\1", line)
            commands.append(re.sub(r"(\S+?)\|\S+", r"\1", line))
    return commands


def test_every_command_line_in_the_readme_parses():
    commands = _readme_commands()
    shown = {c.split()[1] for c in commands}
    assert shown >= {"prepare", "generate", "shards", "train", "run", "evaluate", "predict", "explain", "compress",
                     "export", "serve"}
    for command in commands:
        try:
            parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"README: {command}")


def test_the_spellings_in_use_parse():
    for argv in (["generate", "--checkpoint", "r", "--num-images", "2", "--format", "png", "--output_dir", "o"],
                 ["generate", "--checkpoint", "r", "--num-images", "2", "--format", "png", "--output-dir", "o"]):
        assert parser().parse_args(argv).output_dir == "o"
    args = parser().parse_args(["evaluate", "--checkpoint", "a", "b", "--data", "d", "--no-robustness", "--no-explain",
                                "--no-report", "--workers", "0", "--video-aggregate", "max"])
    given = (args.checkpoints, args.robustness, args.explain, args.report, args.workers)
    assert given == (["a", "b"], False, False, False, 0)
