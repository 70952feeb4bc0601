"""Pipelines: one YAML file whose ``stages:`` run in order, on every rank, under any launcher.

    name: quickstart
    vars: {shards: shards, runs: runs/quickstart, resolution: 32}   # ${name} anywhere below
    stamps: ${runs}/stages                                          # where stage stamps go
    stages:
      - prepare: {source: builtin:lfw, out: "${shards}/lfw", resolution: "${resolution}"}
      - train: {config: configs/dcgan.yaml, set: {name: dcgan, output_dir: "${runs}", data.train: ["${shards}/lfw"]}}
      - generate: {checkpoint: "${runs}/dcgan", num_images: 100, out: "${shards}/lfw-dcgan-fake"}
      - evaluate: {checkpoints: ["${runs}/hybrid"], data: [...], out: "${runs}/evaluation"}
      - compare: {}

``deepfake-dist run FILE [vars.NAME=VALUE ...]`` runs it, and so does ``deepfake-dist train
--config FILE`` (and ``launch/train.py``): ``experiment_kind`` tells a pipeline from a training
config by the file's top-level keys. A stage kind is a class in ``STAGES``; one that runs a
command takes that command's options (``deepfake_dist.options``) as its keys.

Each stage's identity is a hash of its resolved settings and of what it reads (manifest ids of
shard sets, sha256 of model weights); it is recorded in a stamp file when the stage starts
("running") and when it ends ("done"). On a rerun a stage whose stamp is "done" with the same
identity and whose outputs exist is skipped; a "running" one continues (training resumes from
its last checkpoint); a changed one is rebuilt from scratch. Outputs a pipeline did not write
(no stamp) are never overwritten: that is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from deepfake_dist.config import Config, apply_override, read_yaml
from deepfake_dist.envvars import temporary_env
from deepfake_dist.errors import UserError
from deepfake_dist.options import (CrossDatasetOptions, EvaluateOptions, GenerateOptions, MatrixOptions, PrepareOptions,
                                   stage_keys)
from deepfake_dist.registry import Registry, closest

STAGES = Registry("stage")
TOP_KEYS = ("name", "vars", "stamps", "stages")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def experiment_kind(raw: dict, path: str | Path) -> str:
    """What a YAML file (its top-level mapping ``raw``) holds: ``"pipeline"`` when it has a key
    only pipelines have (``stages``, ``vars``, ``stamps``), ``"config"`` (a training config) when
    it has a config section or nothing yet; anything else is neither, a UserError."""
    sections = [f.name for f in dataclasses.fields(Config)]
    if any(key in raw for key in TOP_KEYS if key not in sections):
        return "pipeline"
    if not raw or any(key in sections for key in raw):
        return "config"
    key = str(next(iter(raw)))
    raise UserError(f"{path}: neither a training config nor a pipeline: unknown key '{key}'"
                    f"{closest(key, sections + list(TOP_KEYS))}; a training config has {', '.join(sections)}; "
                    f"a pipeline has {', '.join(TOP_KEYS)}")


class Stage:
    """One step. Subclasses declare ``required`` / ``optional`` keys (with defaults; a command's
    from its options, ``options.stage_keys``) and say what they read and write; ``run`` is
    called on every rank."""

    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[dict[str, Any]] = {}
    options: ClassVar[type | None] = None  # the options dataclass of the command the stage runs
    stamped = True  # False: always runs (cheap, prints)

    def __init__(self, spec: dict, where: str):
        self.where = where
        unknown = [k for k in spec if k not in self.required and k not in self.optional]
        if unknown:
            valid = [*self.required, *self.optional]
            raise UserError(f"{where}: unknown key '{unknown[0]}'{closest(unknown[0], valid)}; valid keys: {', '.join(valid)}")
        missing = [k for k in self.required if k not in spec]
        if missing:
            raise UserError(f"{where}: missing key '{missing[0]}' (required: {', '.join(self.required)})")
        self.spec = {**self.optional, **spec}

    def settings(self) -> dict:
        """What determines the outputs (hashed into the stage's identity)."""
        return self.spec

    def inputs(self) -> dict[str, str]:
        """Identities of what the stage reads (computed once upstream stages are done)."""
        return {}

    def outputs(self) -> list[Path]:
        """Files that exist once the stage has finished."""
        return []

    def owned(self) -> list[Path]:
        """Paths the stage (re)writes; removed before a changed stage is rebuilt."""
        return []

    def done(self) -> bool:
        """Whether the outputs of a stage stamped "done" are still there as it made them."""
        return all(p.exists() for p in self.outputs())

    def adopt(self) -> dict | None:
        """The result of outputs found without this pipeline's stamp that record being made with
        exactly this stage's settings (by another pipeline's identical stage), which the stage
        then takes as its own instead of refusing them; None: they are not."""
        return None

    def run(self, ctx: dict) -> dict:
        raise NotImplementedError


def _manifest_ids(sets) -> dict[str, str]:
    from deepfake_dist.data.loader import manifest_ids

    return manifest_ids([str(s) for s in sets])


def _weights_sha(checkpoint: str, name: str) -> str:
    from deepfake_dist.data.manifest import file_sha256
    from deepfake_dist.models.exported import resolve

    return file_sha256(resolve(checkpoint, name)[0])


class ShardSetStage(Stage):
    """A stage that writes a shard set into ``out``; it is done when the manifest is there."""

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "manifest.json"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def result(self, manifest: dict) -> dict:
        return {"written": [str(self.spec["out"])], "id": manifest["id"], "counts": manifest["counts"]}


@STAGES.register("prepare")
class PrepareStage(ShardSetStage):
    """``data.prepare.prepare`` into ``out``; ``options``: the source kind's own (``videos:``:
    ``data.faces.VideoOptions``, e.g. frames, clips_per_video, frame_level)."""

    options = PrepareOptions
    required, optional = stage_keys(options)

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.data.prepare import prepare

        return self.result(prepare(PrepareOptions(**self.spec, overwrite=True), progress=True))

    def _made_by_this(self) -> dict | None:
        """The set's manifest when it records this very ``prepare`` (the same options, spelled the
        same), else None."""
        from deepfake_dist.data.manifest import load_manifest
        from deepfake_dist.data.prepare import recorded_command

        if not self.outputs()[0].is_file():
            return None
        manifest = load_manifest(self.spec["out"])
        same = manifest.get("created", {}).get("command") == recorded_command(PrepareOptions(**self.spec))
        return manifest if same else None

    def done(self) -> bool:
        """A set shared with another pipeline (``adopt``) may have been made again with its settings."""
        return self._made_by_this() is not None

    def adopt(self) -> dict | None:
        """The two benchmark pipelines share the four prepared datasets this way."""
        manifest = self._made_by_this()
        return None if manifest is None else self.result(manifest)


@STAGES.register("train")
class TrainStage(Stage):
    """``train.loop.train`` on ``config`` with ``set`` (``dotted.key: value``) applied."""

    required = ("config",)
    optional: ClassVar[dict[str, Any]] = {"set": {}}

    def __init__(self, spec: dict, where: str):
        super().__init__(spec, where)
        from deepfake_dist.config import load_config

        if not isinstance(self.spec["set"], dict):
            raise UserError(f"{where}: 'set' must be a mapping of dotted config keys to values")
        overrides = [f"{key}={json.dumps(value)}" for key, value in self.spec["set"].items()]
        self.cfg = load_config(self.spec["config"], overrides)

    def settings(self) -> dict:
        from deepfake_dist.config import to_dict

        return to_dict(self.cfg)

    def inputs(self) -> dict[str, str]:
        return _manifest_ids(sorted(set(self.cfg.data.train + (self.cfg.data.val or []))))

    def outputs(self) -> list[Path]:
        return [self.cfg.run_dir / "summary.json"]

    def owned(self) -> list[Path]:
        return [self.cfg.run_dir]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.train.loop import train

        summary = train(self.cfg)
        if summary.get("stopped"):
            raise StopPipeline()
        written = [str(self.cfg.run_dir)]
        samples = sorted((self.cfg.run_dir / "samples").glob("step-*.png"))
        return {"written": written + [str(samples[-1])] if samples else written, "summary": summary}


@STAGES.register("generate")
class GenerateStage(ShardSetStage):
    """``generate.generate``: a trained generator's fakes as a shard set."""

    options = GenerateOptions
    required, optional = stage_keys(options, also_required=("out",))

    def inputs(self) -> dict[str, str]:
        from deepfake_dist.tasks.generative import EXPORT_NAME

        return {str(self.spec["checkpoint"]): _weights_sha(self.spec["checkpoint"], EXPORT_NAME)}

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.generate import generate

        return self.result(generate(GenerateOptions(**self.spec, overwrite=True), progress=True))


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    """``evaluation.evaluate`` of detectors on ``split`` of ``data``."""

    options = EvaluateOptions
    required, optional = stage_keys(options, also_required=("out",))

    def inputs(self) -> dict[str, str]:
        weights = {str(c): _weights_sha(c, "model") for c in self.spec["checkpoints"]}
        return {**weights, **_manifest_ids(self.spec["data"])}

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "comparison.md"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.evaluation import evaluate

        result = evaluate(EvaluateOptions(**self.spec))
        return {"written": [str(result["out"])], "rows": result["rows"], "data": [str(d) for d in self.spec["data"]],
                "split": self.spec["split"]}


@STAGES.register("cross-dataset")
class CrossDatasetStage(Stage):
    """``evaluation.cross_dataset``: detectors' frame and video AUC on each test set."""

    options = CrossDatasetOptions
    required, optional = stage_keys(options, also_required=("out",))

    def inputs(self) -> dict[str, str]:
        weights = {str(c): _weights_sha(c, "model") for c in self.spec["checkpoints"]}
        return {**weights, **_manifest_ids(self.spec["data"])}

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "cross_dataset.md"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.evaluation.cross_dataset import cross_dataset

        result = cross_dataset(CrossDatasetOptions(**self.spec))
        return {"written": [str(result["out"])], "cross_dataset": result["summary"]}


@STAGES.register("compare")
class CompareStage(Stage):
    """Prints the last evaluation's comparison table and cross-dataset tables (``evaluate`` and
    ``cross-dataset`` print them when they run; this stage when they were skipped), what they
    were computed on, and every path the pipeline wrote."""

    stamped = False

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.console import console
        from deepfake_dist.engine.distributed import distributed_state
        from deepfake_dist.evaluation.compare import comparison_table
        from deepfake_dist.evaluation.cross_dataset import tables

        evaluation = next((r for r in reversed(ctx["results"]) if "rows" in r), None)
        cross = next((r for r in reversed(ctx["results"]) if "cross_dataset" in r), None)
        if evaluation is None and cross is None:
            raise UserError(f"{self.where}: no evaluate or cross-dataset stage before it; add one whose rows it can "
                            "compare")
        if not distributed_state().is_main_process:
            return {}
        if evaluation is not None:
            rows = evaluation["rows"]
            images = rows[0].get("test_images", "?") if rows else "?"
            if evaluation.get("skipped"):  # a fresh evaluation has just printed it
                console.print(comparison_table(rows))
            console.print(f"data: {', '.join(evaluation['data'])} ({evaluation['split']} split, {images} images)",
                          soft_wrap=True)
        if cross is not None and cross.get("skipped"):
            for table in tables(cross["cross_dataset"]):
                console.print(table)
        console.print("written:", soft_wrap=True)
        for path in dict.fromkeys(p for r in ctx["results"] for p in r.get("written", [])):
            console.print(f"  {path}", soft_wrap=True)
        return {}


@STAGES.register("matrix")
class MatrixStage(Stage):
    """The cross-generator matrix (``evaluation.matrix``): a detector per fake set and seed,
    trained on ``real`` and that set alone (and one on all of them), each tested on every
    generator. Its trainings are a pipeline of ``train`` stages of its own (stamps in
    ``OUT/runs/stages``), so an interrupted matrix skips the finished runs and resumes the
    unfinished one; the scoring, seconds long, follows them."""

    options = MatrixOptions
    required, optional = stage_keys(options, also_required=("out",))

    def __init__(self, spec: dict, where: str):
        super().__init__(spec, where)
        self.opts = MatrixOptions(**self.spec)

    @cached_property
    def runs(self) -> list:
        """The training runs (``evaluation.matrix.plan``), checked once the sets exist: at the
        stage's turn, after the stages that write them."""
        from deepfake_dist.evaluation.matrix import plan

        return plan(self.opts, self.where)

    @cached_property
    def trainings(self) -> list[TrainStage]:
        return [TrainStage(run.train, f"{self.where}: run {run.run_dir.name}") for run in self.runs]

    def settings(self) -> dict:
        return {**self.spec, "trainings": [t.settings() for t in self.trainings]}

    def inputs(self) -> dict[str, str]:
        return _manifest_ids([self.opts.real, *self.opts.fakes])

    def outputs(self) -> list[Path]:
        return [Path(self.opts.out) / "matrix.md"]

    def owned(self) -> list[Path]:
        return [Path(self.opts.out)]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.evaluation.matrix import matrix

        trainings = [("train", t.spec, t.where) for t in self.trainings]
        if _run_stages({"name": "matrix", "stamps": Path(self.opts.out) / "runs" / "stages", "stages": trainings}):
            raise StopPipeline()
        _fresh_state()
        return matrix(self.opts, self.runs, wandb=self.trainings[0].cfg.wandb)


def matrix_pipeline(opts: MatrixOptions) -> dict:
    """``deepfake-dist matrix``: a pipeline of the one ``matrix`` stage (its stamp in ``OUT/stages``),
    so the command skips, resumes and rebuilds as the stage does in any pipeline."""
    out = Path(opts.out or f"runs/matrix-{opts.model or Path(opts.config or 'detector').stem}")
    spec = {**dataclasses.asdict(opts), "out": str(out)}
    return {"name": "matrix", "stamps": out / "stages", "stages": [("matrix", spec, "deepfake-dist matrix")]}


class StopPipeline(Exception):
    """A stage stopped on request (SIGTERM/SIGUSR1) after checkpointing; rerun to continue."""


def _interpolate(value: Any, variables: dict, where: str) -> Any:
    def lookup(name: str):
        if name not in variables:
            raise UserError(f"{where}: unknown variable ${{{name}}}{closest(name, list(variables))}; "
                            f"define it under vars: (defined: {', '.join(variables) or 'none'})")
        return variables[name]

    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        return lookup(whole.group(1)) if whole else _VAR.sub(lambda m: str(lookup(m.group(1))), value)
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables, where) for v in value]
    return value


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> dict:
    """The checked pipeline in the YAML file ``path`` (see ``parse_pipeline``)."""
    return parse_pipeline(read_yaml(path), path, overrides)


def parse_pipeline(raw: dict, path: str | Path, overrides: list[str] = ()) -> dict:
    """The checked pipeline: ``{"name", "stamps", "stages": [(kind, spec, where)]}`` with
    variables substituted; ``overrides`` are ``key=value`` on the raw file (e.g. ``vars.x=1``)."""
    path = Path(path)
    for item in overrides:
        apply_override(raw, item, where=f"{path} (override '{item}')")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'{closest(unknown[0], list(TOP_KEYS))}; "
                        f"a pipeline has: {', '.join(TOP_KEYS)}")
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise UserError(f"{path}: 'vars' must be a mapping of names to values")
    name = str(raw.get("name") or path.stem)
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{path}: 'stages' must be a non-empty list, e.g. - prepare: {{source: builtin:lfw, out: shards/lfw}}")
    checked = []
    for i, item in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{where}: each stage is one 'kind: {{settings}}' mapping; kinds: {', '.join(STAGES.names())}")
        (kind, spec), = item.items()
        if kind not in STAGES:
            raise UserError(f"{where}: unknown stage '{kind}'{closest(str(kind), STAGES.names())}; "
                            f"choose one of: {', '.join(STAGES.names())}")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise UserError(f"{where}: the settings of '{kind}' must be a mapping")
        checked.append((kind, _interpolate(spec, variables, where), f"{where} ({kind})"))
    stamps = Path(_interpolate(raw.get("stamps") or f"runs/{name}/stages", variables, f"{path}: stamps"))
    return {"name": name, "stamps": stamps, "stages": checked}


def _identity(stage: Stage) -> str:
    text = json.dumps({"settings": stage.settings(), "inputs": stage.inputs()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fresh_state():
    """The process state for the next stage. Each training or evaluation stage builds its own
    Accelerator (its own precision, DeepSpeed engines, trackers) and Accelerate keeps one per
    process, so the previous one is dropped; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    from deepfake_dist.engine.distributed import distributed_state

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return distributed_state()


@contextmanager
def _one_process_group():
    """One process group for all stages. ``Accelerator.end_training`` (the end of every
    training run) closes the group unless the launcher owns it (Accelerate's ``FORK_LAUNCHED``,
    read by every ``PartialState()``); forming it again reuses the launcher's store and can
    race, so the pipeline owns the group instead and closes it when the last stage is done."""
    try:
        with temporary_env("FORK_LAUNCHED", "1"):
            yield
    finally:
        _fresh_state().destroy_process_group()


def run_pipeline(pipeline: dict) -> int:
    """Run every stage of a checked pipeline (``load_pipeline``) in order on this rank; 0 when
    done, 3 when a stage stopped on request."""
    with _one_process_group():
        return _run_stages(pipeline)


def _run_stages(pipeline: dict) -> int:
    from deepfake_dist.atomic import write_json_atomic
    from deepfake_dist.console import console

    main = _fresh_state().is_main_process
    ctx: dict = {"results": []}
    for i, (kind, spec, where) in enumerate(pipeline["stages"]):
        state = _fresh_state()
        stage = STAGES.get(kind)(spec, where)
        if not stage.stamped:
            ctx["results"].append(stage.run(ctx))
            continue
        stamp_file = pipeline["stamps"] / f"{i:02d}-{kind}.json"
        identity = _identity(stage)
        stamp = _read_stamp(stamp_file)
        same = stamp is not None and stamp.get("identity") == identity
        if same and stamp.get("status") == "done" and stage.done():
            if main:
                console.print(f"[{i}] {kind}: up to date, skipped ({stamp_file})", soft_wrap=True)
            ctx["results"].append({**stamp.get("result", {}), "skipped": True})
            continue
        adopted = stage.adopt() if stamp is None else None
        if adopted is not None:  # another pipeline's identical stage made them
            state.wait_for_everyone()  # every rank has read them before the stamp exists
            if main:
                console.print(f"[{i}] {kind}: made by the same stage of another pipeline, taken as done", soft_wrap=True)
                stamp_file.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(stamp_file, {"stage": kind, "identity": identity, "status": "done", "adopted": True,
                                               "settings": stage.settings(), "inputs": stage.inputs(), "result": adopted})
            ctx["results"].append(adopted)
            continue
        if stamp is None:
            taken = [p for p in stage.owned() if p.exists() and (not p.is_dir() or any(p.iterdir()))]
            if taken:
                raise UserError(f"{where}: {taken[0]} exists but this pipeline did not write it (no stamp "
                                f"{stamp_file}); remove it or write the stage's output elsewhere")
        state.wait_for_everyone()  # every rank has decided before the stamp changes
        if main:
            if stamp is not None and not same:  # settings or inputs changed: rebuild from scratch
                for p in stage.owned():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stamp_file, {"stage": kind, "identity": identity, "status": "running"})
            resumed = same and stamp.get("status") == "running"  # interrupted: training resumes
            console.print(f"[{i}] {kind}: {'continuing' if resumed else 'running'}", soft_wrap=True)
        state.wait_for_everyone()
        try:
            result = stage.run(ctx)
        except StopPipeline:
            if main:
                console.print(f"stopped in stage {i} ({kind}); rerun the same command to continue", soft_wrap=True)
            return 3
        state.wait_for_everyone()
        if main:
            write_json_atomic(stamp_file, {"stage": kind, "identity": identity, "status": "done",
                                           "settings": stage.settings(), "inputs": stage.inputs(), "result": result})
        state.wait_for_everyone()
        ctx["results"].append(result)
    return 0
