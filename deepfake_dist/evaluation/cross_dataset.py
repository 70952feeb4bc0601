"""``cross-dataset``: DeepfakeBench's cross-dataset table (Yan et al., arXiv 2307.01426).

Detectors trained on one dataset (FaceForensics++ c23) are scored on the test split of each test
set (a shard set each: FF++, Celeb-DF v2, DFDC, DFDCP), and each set gets two columns: frame AUC
(every frame a sample) and video AUC (a video's score is the mean of its frames' probabilities,
as DeepfakeBench's ``get_video_metrics``), with their mean over the sets. DeepfakeBench's
published frame AUC stands beside each set's as a reference column.

A set whose fakes come from several methods (FF++'s four manipulations, DFDCP's two) also gets a
row per method: that method's fakes against all the set's real frames (videos), as DeepfakeBench
tests FF-DF, FF-F2F, FF-FS and FF-NT. AUC needs no threshold, so nothing is fitted: the split is
scored once. Scoring is ``evaluate``'s (each rank its own shards, the predictions gathered), so
every rank computes the same table; the main process writes and prints it.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from deepfake_dist.console import console
from deepfake_dist.data.loader import eval_loader
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.evaluation.compare import csv_rows, markdown, rich_table
from deepfake_dist.evaluation.metrics import binary_metrics
from deepfake_dist.evaluation.predictions import Predictions, predict
from deepfake_dist.evaluation.runner import eval_accelerator, load_detector, unique_runs
from deepfake_dist.evaluation.sources import source_name
from deepfake_dist.evaluation.video import video_predictions
from deepfake_dist.models import model_io
from deepfake_dist.options import CrossDatasetOptions

# DeepfakeBench's frame-level AUC of detectors trained on FF++ c23 (arXiv 2307.01426, the
# cross-dataset table), by our detector name and test set name (``set_name``).
DEEPFAKEBENCH = {
    "xception": {"FaceForensics++ c23": 0.9637, "Celeb-DF-v2": 0.7365, "DFDC": 0.7077, "DFDCP": 0.7374},
    "efficientnet_b4": {"FaceForensics++ c23": 0.9567, "Celeb-DF-v2": 0.7487, "DFDC": 0.6955, "DFDCP": 0.7283},
}
REFERENCE_ARCHS = {"legacy_xception": "xception", "efficientnet_b4": "efficientnet_b4"}  # model.name: timm
SHORT = {"FaceForensics++": "FF++", "Celeb-DF-v2": "CDF-v2"}  # column headers
TEXT = ("run", "model", "reference", "set", "method")
OUTPUTS = ("cross_dataset.md", "cross_dataset.csv", "cross_dataset_methods.csv", "cross_dataset.json")


def set_name(folder: str) -> str:
    """A test set's name: the dataset its manifest records (with FF++'s compression level), else
    the shard set's folder name."""
    manifest = load_manifest(folder)
    dataset = manifest.get("preprocessing", {}).get("dataset", {})
    if not dataset.get("name"):
        return manifest.get("name") or Path(folder).name
    return " ".join(filter(None, (dataset["name"], dataset.get("compression"))))


def _unique(names: list[str], folders: list[str]) -> list[str]:
    return [f"{n} ({Path(f).name})" if names.count(n) > 1 else n for n, f in zip(names, folders)]


def reference_of(info: dict, given: str | None) -> str | None:
    """The DeepfakeBench row shown beside a checkpoint: ``given``, else its own model's, if published."""
    if given is not None:
        return given
    if info["model"] in DEEPFAKEBENCH:
        return info["model"]
    arch = str(info.get("model_args", {}).get("arch", "")).split(".")[0]
    return REFERENCE_ARCHS.get(arch)


def _subset(preds: Predictions, index: list[int]) -> Predictions:
    at = torch.tensor(index, dtype=torch.long)
    return Predictions(preds.logits[at], preds.labels[at], [preds.keys[i] for i in index],
                       [preds.metas[i] for i in index])


def _auc(preds: Predictions | None) -> float | None:
    """ROC-AUC, or None when the samples are not of both classes (or there are none)."""
    if preds is None or not preds.keys:
        return None
    return binary_metrics(preds.scores, preds.labels).get("auroc")


def _levels(preds: Predictions) -> dict:
    """Frame and video counts and AUCs of these predictions."""
    videos = video_predictions(preds, "mean")
    return {"frames": len(preds.keys), "fake_frames": int(preds.labels.sum()), "frame_auc": _auc(preds),
            "videos": len(videos.keys) if videos is not None else 0,
            "fake_videos": int(videos.labels.sum()) if videos is not None else 0, "video_auc": _auc(videos)}


def score_set(preds: Predictions) -> dict:
    """One test set's levels (``_levels``) and, when its fakes come from several methods, one
    entry per method (its fakes against every real sample of the set) under ``methods``."""
    method_of = [source_name(k, m, y) for k, m, y in zip(preds.keys, preds.metas, preds.labels.tolist())]
    reals = [i for i, y in enumerate(preds.labels.tolist()) if y == 0]
    fakes = sorted({m for m, y in zip(method_of, preds.labels.tolist()) if y == 1})
    result = {**_levels(preds), "methods": []}
    if len(fakes) > 1:
        for method in fakes:
            index = reals + [i for i, m in enumerate(method_of) if m == method]
            result["methods"].append({"method": method.split("/", 1)[1], **_levels(_subset(preds, sorted(index)))})
    return result


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and None not in values else None


def table_rows(names: list[str], runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The cross-dataset rows (one per run: each set's frame and video AUC and DeepfakeBench's
    frame AUC, and their means) and the per-method rows."""
    rows, methods = [], []
    for run in runs:
        published = DEEPFAKEBENCH.get(run["reference"], {})
        row = {"run": run["run"], "model": run["model"], "reference": run["reference"]}
        for name in names:
            scored = run["sets"][name]
            row.update({f"{name}/frame_auc": scored["frame_auc"], f"{name}/video_auc": scored["video_auc"],
                        f"{name}/deepfakebench": published.get(name)})
            methods += [{"run": run["run"], "set": name, **m} for m in scored["methods"]]
        for level in ("frame_auc", "video_auc", "deepfakebench"):
            row[f"average/{level}"] = _mean([row[f"{name}/{level}"] for name in names])
        rows.append(row)
    return rows, methods


def columns(names: list[str]) -> list[tuple[str, str, str]]:
    cols = [("run", "run", "{}"), ("model", "model", "{}")]
    for name in [*names, "average"]:
        short = " ".join(SHORT.get(w, w) for w in name.split(" "))
        cols += [(f"{name}/frame_auc", f"{short} frame", "{:.4f}"), (f"{name}/video_auc", f"{short} video", "{:.4f}"),
                 (f"{name}/deepfakebench", f"{short} DFB frame", "{:.4f}")]
    return cols + [("reference", "DFB row", "{}")]


METHOD_COLUMNS = [("run", "run", "{}"), ("set", "test set", "{}"), ("method", "method", "{}"),
                  ("frames", "frames", "{}"), ("fake_frames", "fake frames", "{}"), ("videos", "videos", "{}"),
                  ("fake_videos", "fake videos", "{}"), ("frame_auc", "frame AUC", "{:.4f}"),
                  ("video_auc", "video AUC", "{:.4f}")]


def titles(summary: dict) -> tuple[str, str]:
    split = summary["split"]
    return (f"Cross-dataset ROC-AUC on the {split} split of each set: frame, and video (a video's score is the mean of "
            "its frames' probabilities); DFB frame: DeepfakeBench's published frame AUC (arXiv 2307.01426) of the "
            "detector in the DFB row; average: over the sets",
            f"Per method ({split} split): each method's fakes against all real frames (videos) of its set")


def tables(summary: dict) -> list:
    """The rich tables of a summary (``cross_dataset``'s ``summary``, or a stage's stamped copy)."""
    main, per_method = titles(summary)
    out = [rich_table(main, columns(summary["sets"]), summary["rows"], TEXT)]
    if summary["methods"]:
        out.append(rich_table(per_method, METHOD_COLUMNS, summary["methods"], TEXT))
    return out


def _markdown(summary: dict, sets: list[dict], command: str) -> str:
    main, per_method = titles(summary)
    parts = [f"# Cross-dataset evaluation\n\nCreated {summary['created']} by:\n\n```\n{command}\n```\n",
             markdown(main, columns(summary["sets"]), summary["rows"], TEXT)]
    if summary["methods"]:
        parts.append(markdown(per_method, METHOD_COLUMNS, summary["methods"], TEXT))
    set_cols = [("name", "test set", "{}"), ("path", "shard set", "{}"), ("id", "manifest id", "{}"),
                ("samples", f"{summary['split']} samples", "{}")]
    parts.append(markdown("Test sets", set_cols, sets, ("name", "path", "id")))
    return "\n".join(parts)


def default_out(checkpoints: list[str]) -> Path:
    """``RUN/cross-dataset`` for one checkpoint, ``cross-dataset`` in the working folder for several."""
    if len(checkpoints) == 1:
        path = Path(checkpoints[0])
        return (path if path.is_dir() else path.parent) / "cross-dataset"
    return Path("cross-dataset")


def _check(opts: CrossDatasetOptions) -> None:
    if not opts.checkpoints:
        raise UserError("cross-dataset: no --checkpoint given; pass run folders or model.safetensors files")
    if not opts.data:
        raise UserError("cross-dataset: no --data given; pass a shard set folder per test set, e.g. --data "
                        "shards/ffpp-c23 shards/celebdf")
    if opts.reference is not None and opts.reference not in DEEPFAKEBENCH:
        raise UserError(f"--reference {opts.reference}: DeepfakeBench's table has {', '.join(DEEPFAKEBENCH)}")
    if opts.batch_size <= 0:
        raise UserError(f"--batch-size {opts.batch_size}: must be positive")
    for folder in opts.data:
        if split_count(load_manifest(folder), opts.split) == 0:  # a missing set is its own one line
            raise UserError(f"--data {folder}: no '{opts.split}' samples; prepare it with a {opts.split} split")


def cross_dataset(opts: CrossDatasetOptions, *, accelerator=None, command: str | None = None) -> dict:
    """Score each detector of ``opts.checkpoints`` on ``split`` of every set of ``opts.data`` (a
    column pair each) and write ``cross_dataset.md``, ``.csv``, ``_methods.csv`` and ``.json``
    into ``out`` (main process; default ``default_out``); the tables are printed there too.

    Call it on every rank. Returns ``{"out": Path, "summary": {"split", "sets", "rows",
    "methods", ...}}``: ``rows`` hold ``SET/frame_auc``, ``SET/video_auc`` and
    ``SET/deepfakebench`` per set name (``set_name``) and ``average/...``; ``methods`` one row per
    (run, set, method) with frames, videos and both AUCs.
    """
    opts = replace(opts, checkpoints=[str(c) for c in opts.checkpoints], data=[str(d) for d in opts.data])
    _check(opts)
    names = _unique([set_name(folder) for folder in opts.data], opts.data)
    accelerator = accelerator or eval_accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    runs = []
    for checkpoint, run in zip(opts.checkpoints, unique_runs(opts.checkpoints)):
        model, info, reading = load_detector(checkpoint, opts.batch_size, opts.workers, accelerator.device)
        inputs, heads = model_io(info["model"])
        scored = {}
        for name, folder in zip(names, opts.data):
            if main:
                console.print(f"[bold]{run}[/bold]: scoring the {opts.split} split of {name} ({folder}) on {world} "
                              "process(es)")
            loader = eval_loader([folder], opts.split, reading, rank, world)
            scored[name] = score_set(predict(accelerator, model, loader, inputs, heads))
        arch = info.get("model_args", {}).get("arch")
        runs.append({"run": run, "checkpoint": checkpoint, "model": f"{info['model']} ({arch})" if arch else info["model"],
                     "reference": reference_of(info, opts.reference), "sets": scored})
    rows, methods = table_rows(names, runs)
    summary = {"split": opts.split, "sets": names, "rows": rows, "methods": methods,
               "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "world_size": world}
    out = Path(opts.out) if opts.out is not None else default_out(opts.checkpoints)
    if main:
        command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        with out_of_space_is_one_line(f"the cross-dataset results in {out}", out, OUTPUTS_WHOLE):
            _write(out, summary, runs, opts, command)
        for table in tables(summary):
            console.print(table)
        console.print(f"results in {out}")
    accelerator.wait_for_everyone()
    return {"out": out, "summary": summary}


def _write(out: Path, summary: dict, runs: list[dict], opts: CrossDatasetOptions, command: str) -> None:
    from deepfake_dist.atomic import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    sets = []
    for name, folder in zip(summary["sets"], opts.data):
        manifest = load_manifest(folder)
        sets.append({"name": name, "path": folder, "id": manifest["id"], "source": manifest.get("source"),
                     "samples": split_count(manifest, opts.split)})
    write_text_atomic(out / "cross_dataset.md", _markdown(summary, sets, command))
    write_text_atomic(out / "cross_dataset.csv", csv_rows(columns(summary["sets"]), summary["rows"]))
    write_text_atomic(out / "cross_dataset_methods.csv", csv_rows(METHOD_COLUMNS, summary["methods"]))
    write_json_atomic(out / "cross_dataset.json", {**summary, "command": command, "data": sets,
                                                   "deepfakebench": DEEPFAKEBENCH, "runs": runs}, indent=1)
