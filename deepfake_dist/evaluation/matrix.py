"""The cross-generator matrix: does a detector catch fakes from a generator it never saw?

One detector per fake set (trained on the real set and that generator's fakes alone) and one on
all fake sets, each trained once per seed; each is then tested on every generator: a column is
the real set's test split plus one generator's test split. Rows: trained on; columns: tested on;
cells: ROC-AUC and AP, their mean and spread over the seeds; a row's off-diagonal mean is how well
its detector does on the generators it did not see.

``plan`` lays out the training runs (the ``matrix`` pipeline stage trains them as ``train``
stages); ``matrix`` scores every run with the evaluation's gathered scoring (``predictions.predict``:
every rank scores its own shards, nothing lost or counted twice) and writes the results.
"""

from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from deepfake_dist.console import console
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.metrics import binary_metrics
from deepfake_dist.options import MatrixOptions

ALL = "all"  # the row of the detector trained on every fake set
METRICS = {"auroc": "ROC-AUC", "ap": "AP"}
AIM = {"diagonal": 0.95, "off_diagonal": 0.85}  # the generalization target: seen and unseen generators' AUC
# what the matrix sets in every run's config, so an override cannot change it
SET_PER_RUN = ("name", "output_dir", "seed", "data.train", "data.val")


class MatrixRun(NamedTuple):
    row: str  # the fake set's name, or ALL
    seed: int
    sets: list[str]  # what it trains and validates on: the real set and the row's fake set(s)
    run_dir: Path
    train: dict  # the ``train`` stage's settings: {"config", "set"}


def set_name(shard_set: str) -> str:
    """A set's name in the matrix: its folder's name, which also prefixes its samples' keys."""
    return Path(str(shard_set).rstrip("/")).name


def config_path(opts: MatrixOptions, where: str) -> Path:
    """``--config``, or ``configs/MODEL.yaml`` for ``--model``: exactly one of them."""
    if (opts.model is None) == (opts.config is None):
        raise UserError(f"{where}: give the detector as model: NAME (trains configs/NAME.yaml) or as config: FILE, "
                        f"one of the two ({'both' if opts.model else 'neither'} given)")
    path = Path(opts.config or Path("configs") / f"{opts.model}.yaml")
    if not path.is_file():
        hint = "give config: FILE" if opts.model else "check the path"
        raise UserError(f"{where}: no detector config {path} (in {Path.cwd()}); {hint}")
    return path


def plan(opts: MatrixOptions, where: str) -> list[MatrixRun]:
    """The training runs, every (row, seed): refused in one line before any work when a set is
    missing, lacks the split or its images of the label it is given as (real or fake), or two
    sets share a name (their samples could not be told apart)."""
    taken = next((f for f in opts.fakes if "=" in str(f)), None)
    if taken is not None:  # --fakes a b key=value: argparse gives the override to --fakes
        raise UserError(f"{where}: fake set '{taken}' looks like an override; put overrides before --real and "
                        "--fakes, or after --")
    if len(opts.fakes) < 2:
        raise UserError(f"{where}: a matrix needs two or more fake sets, one per generator (fakes: {opts.fakes})")
    sets = [opts.real, *opts.fakes]
    names = [set_name(s) for s in sets]
    twins = sorted({n for n in names if names.count(n) > 1})
    if twins:
        raise UserError(f"{where}: two sets are named '{twins[0]}'; a set is known by its folder's name in the matrix, "
                        "so give each set a folder name of its own")
    if ALL in names:
        raise UserError(f"{where}: a set may not be named '{ALL}' (the row of the detector trained on all fakes)")
    for shard_set, label in zip(sets, ["real", *["fake"] * len(opts.fakes)]):
        manifest = load_manifest(shard_set)
        if split_count(manifest, opts.split) == 0:
            raise UserError(f"{where}: {shard_set} has no '{opts.split}' split to test on; prepare it with one")
        if split_count(manifest, opts.split, label) == 0:
            raise UserError(f"{where}: the '{opts.split}' split of {shard_set} holds no {label} images; give the real "
                            "faces as real and each generator's fakes in fakes")
    if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds):
        raise UserError(f"{where}: seeds must be one or more distinct integers (seeds: {opts.seeds})")
    overrides = _overrides(opts.overrides, where)
    config = str(config_path(opts, where))
    rows = [(set_name(f), [f]) for f in opts.fakes] + ([(ALL, list(opts.fakes))] if opts.all else [])
    runs = []
    for row, fakes in rows:
        for seed in opts.seeds:
            name, trained = f"{row}-seed{seed}", [str(opts.real), *map(str, fakes)]
            per_run = {"name": name, "output_dir": str(Path(opts.out) / "runs"), "seed": seed,
                       "data.train": trained, "data.val": trained}
            runs.append(MatrixRun(row, seed, trained, Path(opts.out) / "runs" / name,
                                  {"config": config, "set": {**overrides, **per_run}}))
    return runs


def _overrides(items: list[str], where: str) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise UserError(f"{where}: override '{item}' must look like key.sub=value")
        if key.strip() in SET_PER_RUN:
            raise UserError(f"{where}: override '{item}': the matrix sets {key.strip()} for each run itself "
                            f"({', '.join(SET_PER_RUN)})")
        out[key.strip()] = yaml.safe_load(value)
    return out


def score_run(accelerator, run: MatrixRun, sets: list[str], opts: MatrixOptions) -> tuple[dict[str, dict], dict]:
    """One run's ROC-AUC and AP on each column (the real set's split with one fake set's), and
    its exported model's JSON."""
    from deepfake_dist.data.loader import eval_loader
    from deepfake_dist.evaluation.predictions import predict
    from deepfake_dist.evaluation.runner import load_detector

    model, info, reading = load_detector(run.run_dir, opts.batch_size, opts.workers, accelerator.device)
    preds = predict(accelerator, model, eval_loader(sets, opts.split, reading, accelerator.process_index,
                                                    accelerator.num_processes))
    origin = [key.split("/", 1)[0] for key in preds.keys]  # the loader prefixes each key with its set's name
    real = set_name(sets[0])
    cells = {}
    for fake in map(set_name, sets[1:]):
        keep = torch.tensor([o in (real, fake) for o in origin])
        labels = preds.labels[keep]
        if labels.numel() == 0 or labels.min() == labels.max():
            raise UserError(f"the {opts.split} split of {sets[0]} and {fake} holds one class only; the real set must "
                            "hold real faces and each fake set fakes")
        metrics = binary_metrics(preds.scores[keep], labels)
        cells[fake] = {"auroc": metrics["auroc"], "ap": metrics["ap"], "real": int((labels == 0).sum()),
                       "fake": int((labels == 1).sum())}
    return cells, info


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "seeds": values}


def _off_diagonal(row_scores: dict[str, dict], row: str, metric: str) -> float:
    """A row's mean over the generators its detector did not see."""
    return statistics.fmean(cell[metric] for column, cell in row_scores.items() if column != row)


def summarise(scores: dict[tuple[str, int], dict], rows: list[str], columns: list[str], seeds: list[int]) -> dict:
    """From ``scores[(row, seed)][column][metric]``: each cell's and each row's off-diagonal mean
    over the seeds (mean, std, min, max), and the detector's diagonal and off-diagonal mean
    (averaged over the single-generator rows for each seed, then spread over the seeds)."""
    own = [r for r in rows if r in columns]  # the rows of one generator: ALL has no off-diagonal
    out: dict = {"cells": {}, "off_diagonal": {}, "overall": {}}
    for metric in METRICS:
        out["cells"][metric] = {r: {c: _spread([scores[r, s][c][metric] for s in seeds]) for c in columns} for r in rows}
        out["off_diagonal"][metric] = {r: _spread([_off_diagonal(scores[r, s], r, metric) for s in seeds]) for r in own}
        out["overall"][metric] = {
            "diagonal": _spread([statistics.fmean(scores[r, s][r][metric] for r in own) for s in seeds]),
            "off_diagonal": _spread([statistics.fmean(_off_diagonal(scores[r, s], r, metric) for r in own)
                                     for s in seeds])}
    auc = out["overall"]["auroc"]
    out["aim_met"] = auc["diagonal"]["mean"] >= AIM["diagonal"] and auc["off_diagonal"]["mean"] >= AIM["off_diagonal"]
    return out


def matrix(opts: MatrixOptions, runs: list[MatrixRun], *, wandb=None, command: str | None = None,
           accelerator=None) -> dict:
    """Score every trained run of ``plan`` on every column, then (main process) write
    ``matrix.md``, ``matrix.csv``, ``matrix.json``, ``matrix.png`` and the report (``report.md``,
    ``index.html``) into ``opts.out``, log them to wandb (``wandb``: the runs' wandb config) and
    print the tables. Call it on every rank; ``command`` (default: this process's) goes into the
    report. Returns ``{"written", "overall", "aim_met"}``."""
    from deepfake_dist.evaluation.matrix_report import print_matrix, write_matrix
    from deepfake_dist.evaluation.runner import eval_accelerator

    accelerator = accelerator or eval_accelerator()
    sets = [str(opts.real), *map(str, opts.fakes)]
    columns = [set_name(f) for f in opts.fakes]
    rows = list(dict.fromkeys(r.row for r in runs))
    scores, trained = {}, []
    for run in runs:
        if accelerator.is_main_process:
            console.print(f"matrix: scoring {run.run_dir.name} on the {opts.split} split of {len(sets)} sets", soft_wrap=True)
        scores[run.row, run.seed], info = score_run(accelerator, run, sets, opts)
        trained.append({"row": run.row, "seed": run.seed, "run": str(run.run_dir), "manifests": info.get("manifests", {}),
                        "val_auroc": info.get("val_metrics", {}).get("auroc"), "step": info.get("step")})
    summary = {"detector": opts.model or Path(opts.config).stem, "config": str(runs[0].train["config"]),
               "real": str(opts.real), "fakes": [str(f) for f in opts.fakes], "split": opts.split,
               "seeds": list(opts.seeds), "rows": rows, "columns": columns,
               "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "world_size": accelerator.num_processes,
               "images": {c: {k: scores[runs[0].row, runs[0].seed][c][k] for k in ("real", "fake")} for c in columns},
               "scores": [{"trained_on": r, "seed": s, "tested_on": c, **cell}
                          for (r, s), row in scores.items() for c, cell in row.items()],
               "runs": trained,
               **summarise(scores, rows, columns, list(opts.seeds))}
    written = []
    if accelerator.is_main_process:
        written = write_matrix(Path(opts.out), summary, wandb)
        print_matrix(summary)
    accelerator.wait_for_everyone()
    return {"written": [str(p) for p in written], "overall": summary["overall"], "aim_met": summary["aim_met"]}
