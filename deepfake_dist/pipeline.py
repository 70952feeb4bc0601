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

``deepfake-dist train --config FILE [vars.NAME=VALUE ...]`` (and ``launch/train.py``) runs it.
A stage kind is a class in ``STAGES``. Each stage's identity is a hash of its resolved settings
and of what it reads (manifest ids of shard sets, sha256 of model weights); it is recorded in
a stamp file when the stage starts ("running") and when it ends ("done"). On a rerun a stage
whose stamp is "done" with the same identity and whose outputs exist is skipped; a "running"
one continues (training resumes from its last checkpoint); a changed one is rebuilt from
scratch. Outputs a pipeline did not write (no stamp) are never overwritten: that is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import yaml

from deepfake_dist.config import apply_override
from deepfake_dist.envvars import temporary_env
from deepfake_dist.errors import UserError
from deepfake_dist.registry import Registry, closest

STAGES = Registry("stage")
TOP_KEYS = ("name", "vars", "stamps", "stages")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_pipeline(path: str | Path) -> bool:
    """A YAML file with a top-level ``stages:`` list (anything unreadable is left to the config loader)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "stages" in raw


class Stage:
    """One step. Subclasses declare ``required`` / ``optional`` keys (with defaults) and say
    what they read and write; ``run`` is called on every rank."""

    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[dict[str, Any]] = {}
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

    def run(self, ctx: dict) -> dict:
        raise NotImplementedError


def _manifest_ids(sets) -> dict[str, str]:
    from deepfake_dist.data.loader import manifest_ids

    return manifest_ids([str(s) for s in sets])


def _weights_sha(checkpoint: str, name: str) -> str:
    from deepfake_dist.data.manifest import file_sha256
    from deepfake_dist.exported import resolve

    return file_sha256(resolve(checkpoint, name)[0])


@STAGES.register("prepare")
class PrepareStage(Stage):
    """``data.prepare.prepare`` into ``out``; ``options``: the source kind's own (``videos:``:
    frames, clips_per_video, sampling, frame_step, margin, face_model, frame_level)."""

    required = ("source", "out")
    optional: ClassVar[dict[str, Any]] = {
        "resolution": 64, "format": "png", "shard_size": 1000, "split": [0.8, 0.1, 0.1], "workers": 1,
        "label": None, "seed": 0, "quality": 95, "options": {}}

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "manifest.json"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.data.prepare import prepare

        s = self.spec
        manifest = prepare(s["source"], s["out"], resolution=s["resolution"], fmt=s["format"],
                           shard_size=s["shard_size"], split=s["split"], workers=s["workers"], label=s["label"],
                           seed=s["seed"], quality=s["quality"], overwrite=True, progress=True, options=s["options"])
        return {"written": [str(s["out"])], "id": manifest["id"], "counts": manifest["counts"]}


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
class GenerateStage(Stage):
    """``generate.generate``: a trained generator's fakes as a shard set."""

    required = ("checkpoint", "num_images", "out")
    optional: ClassVar[dict[str, Any]] = {
        "truncation": None, "steps": None, "seed": 0, "batch_size": 64, "split": [0.8, 0.1, 0.1], "shard_size": 1000,
        "encoding": "png"}

    def inputs(self) -> dict[str, str]:
        from deepfake_dist.tasks.generative import EXPORT_NAME

        return {str(self.spec["checkpoint"]): _weights_sha(self.spec["checkpoint"], EXPORT_NAME)}

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "manifest.json"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.generate import generate

        s = self.spec
        manifest = generate(s["checkpoint"], s["num_images"], s["out"], truncation=s["truncation"], seed=s["seed"],
                            batch_size=s["batch_size"], split=s["split"], shard_size=s["shard_size"],
                            encoding=s["encoding"], overwrite=True, progress=True, steps=s["steps"])
        return {"written": [str(s["out"])], "id": manifest["id"], "counts": manifest["counts"]}


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    """``evaluation.evaluate`` of detectors on ``split`` of ``data``."""

    required = ("checkpoints", "data", "out")
    optional: ClassVar[dict[str, Any]] = {
        "split": "test", "val_split": "val", "robustness": True, "explain": True, "report": True, "batch_size": 64}

    def inputs(self) -> dict[str, str]:
        weights = {str(c): _weights_sha(c, "model") for c in self.spec["checkpoints"]}
        return {**weights, **_manifest_ids(self.spec["data"])}

    def outputs(self) -> list[Path]:
        return [Path(self.spec["out"]) / "comparison.md"]

    def owned(self) -> list[Path]:
        return [Path(self.spec["out"])]

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.evaluation import evaluate

        s = self.spec
        result = evaluate([str(c) for c in s["checkpoints"]], [str(d) for d in s["data"]], s["split"], s["out"],
                          val_split=s["val_split"], robustness=s["robustness"], explain=s["explain"],
                          report=s["report"], batch_size=s["batch_size"])
        return {"written": [str(result["out"])], "rows": result["rows"], "data": [str(d) for d in s["data"]],
                "split": s["split"]}


@STAGES.register("compare")
class CompareStage(Stage):
    """Prints the last evaluation's comparison table (``evaluate`` prints it when it runs; this
    stage when it was skipped), what it was computed on, and every path the pipeline wrote."""

    stamped = False

    def run(self, ctx: dict) -> dict:
        from deepfake_dist.engine.distributed import distributed_state
        from deepfake_dist.evaluation.compare import comparison_table
        from deepfake_dist.console import console

        evaluation = next((r for r in reversed(ctx["results"]) if "rows" in r), None)
        if evaluation is None:
            raise UserError(f"{self.where}: no evaluate stage before it; add one whose rows it can compare")
        if distributed_state().is_main_process:
            rows = evaluation["rows"]
            images = rows[0].get("test_images", "?") if rows else "?"
            if evaluation.get("skipped"):  # a fresh evaluation has just printed it
                console.print(comparison_table(rows))
            console.print(f"data: {', '.join(evaluation['data'])} ({evaluation['split']} split, {images} images)",
                          soft_wrap=True)
            console.print("written:", soft_wrap=True)
            for path in dict.fromkeys(p for r in ctx["results"] for p in r.get("written", [])):
                console.print(f"  {path}", soft_wrap=True)
        return {}


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
    """The checked pipeline: ``{"name", "stamps", "stages": [(kind, spec, where)]}`` with
    variables substituted; ``overrides`` are ``key=value`` on the raw file (e.g. ``vars.x=1``)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
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


def run_pipeline(path: str | Path, overrides: list[str] = ()) -> int:
    """Run every stage in order on this rank; 0 when done, 3 when a stage stopped on request."""
    pipeline = load_pipeline(path, overrides)
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
        if same and stamp.get("status") == "done" and all(p.exists() for p in stage.outputs()):
            if main:
                console.print(f"[{i}] {kind}: up to date, skipped ({stamp_file})", soft_wrap=True)
            ctx["results"].append({**stamp.get("result", {}), "skipped": True})
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
