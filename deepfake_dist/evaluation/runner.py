"""``evaluate``: score exported detectors on shard sets across ranks and write the results.

Every rank scores its own shards (``evaluation.predictions.predict`` gathers them with no sample
lost or counted twice), so every rank holds the same predictions and computes the same numbers;
only the main process writes files and draws pictures. The operating threshold and the temperature
come from the validation split; the test split is scored once and never tunes anything.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deepfake_dist.console import console
from deepfake_dist.data.audio import audio_samples
from deepfake_dist.data.loader import EvalOptions, clip_frames, eval_loader
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.evaluation import metrics as M
from deepfake_dist.evaluation.modalities import has_stream_labels, per_category, per_modality
from deepfake_dist.evaluation.predictions import Predictions, predict
from deepfake_dist.evaluation.robustness import PERTURBATIONS
from deepfake_dist.evaluation.sources import per_source
from deepfake_dist.evaluation.video import aggregate_scores, video_predictions
from deepfake_dist.models import model_io
from deepfake_dist.models.exported import in_channels, load_exported, resolve
from deepfake_dist.options import EvaluateOptions

SUMMARY_KEYS = ("accuracy", "precision", "recall", "f1", "auroc", "ap", "eer")


@dataclass
class Scored:
    """One detector's evaluation: what every rank computes from the gathered predictions."""

    checkpoint: str
    run: str
    model: torch.nn.Module
    info: dict
    data: list[str]  # the shard sets scored
    reading: EvalOptions  # how they were read
    test: Predictions
    val: Predictions | None
    result: dict  # JSON-ready: row, metrics, sources, calibration, robustness, video
    videos: Predictions | None = None  # one row per video, when the samples name their video


def eval_accelerator():
    """An Accelerator for any launch: gloo on CPU-only machines under torchrun / accelerate
    launch (see ``engine.distributed.distributed_state``), the GPU otherwise."""
    from accelerate import Accelerator

    from deepfake_dist.engine.distributed import distributed_state

    state = distributed_state()
    return Accelerator(cpu=state.device.type == "cpu")


def run_name(checkpoint: str | Path) -> str:
    """``runs/x`` and ``runs/x/model.safetensors`` -> ``x``; ``dir/other.safetensors`` -> ``other``."""
    path = Path(checkpoint)
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.stem == "model" else path.stem


def unique_runs(checkpoints: list[str]) -> list[str]:
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name(c)) for c in checkpoints]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def default_out(checkpoints: list[str], split: str) -> Path:
    """``RUN/eval-SPLIT`` for one checkpoint, ``eval-SPLIT`` in the working folder for several."""
    if len(checkpoints) == 1:
        path = Path(checkpoints[0])
        return (path if path.is_dir() else path.parent) / f"eval-{split}"
    return Path(f"eval-{split}")


def has_split(data: list[str], split: str) -> bool:
    return any(split_count(load_manifest(s), split) > 0 for s in data)


@torch.no_grad()
def throughput(accelerator, model: torch.nn.Module, shapes: list[tuple], seconds: float = 1.0) -> float:
    """Forward-only samples/s of one process on a fixed batch of inputs of ``shapes`` (one per
    model input; after one warm-up)."""
    xs = [torch.randn(shape, device=accelerator.device) for shape in shapes]

    def step():
        with accelerator.autocast():
            model(*xs)
        if xs[0].is_cuda:
            torch.cuda.synchronize()

    step()
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * shapes[0][0] / (time.perf_counter() - start)


def _metrics_pair(preds: Predictions, threshold: float | None) -> dict:
    """Metrics at 0.5 and, when a validation threshold exists, at it."""
    out = {"0.5": M.detection_metrics(preds.scores, preds.labels, 0.5)}
    if threshold is not None:
        out["val"] = M.detection_metrics(preds.scores, preds.labels, threshold)
    return out


def _calibration(test: Predictions, val: Predictions | None) -> dict:
    out = {"ece": M.ece(test.scores, test.labels), "bins": M.reliability(test.scores, test.labels)}
    if val is not None:
        t = M.fit_temperature(val.logits, val.labels)
        scaled = torch.sigmoid(test.logits / t)
        out.update(temperature=t, ece_scaled=M.ece(scaled, test.labels), bins_scaled=M.reliability(scaled, test.labels),
                   ece_val=M.ece(val.scores, val.labels),
                   ece_val_scaled=M.ece(torch.sigmoid(val.logits / t), val.labels))
    return out


def _video_level(videos: Predictions, val: Predictions | None, how: str) -> dict:
    """Metrics over whole videos (``evaluation.video``); their threshold is chosen on the
    validation videos, never on the reported split."""
    val_videos = video_predictions(val, how) if val is not None else None
    threshold = None
    if val_videos is not None and val_videos.labels.min() != val_videos.labels.max():
        threshold = M.val_threshold(val_videos.scores, val_videos.labels)
    return {"aggregate": how, "videos": len(videos.keys), "threshold": threshold,
            "metrics": _metrics_pair(videos, threshold)}


def load_detector(checkpoint: str | Path, batch_size: int, workers: int, device) -> tuple[torch.nn.Module, dict, EvalOptions]:
    """An exported detector on ``device``, its JSON, and how evaluation reads images for it (its
    resolution, channels and normalisation; ``batch_size`` and ``workers`` per process)."""
    model, info = load_exported(checkpoint)
    if info.get("kind") != "detector":
        raise UserError(f"--checkpoint {checkpoint}: holds a {info.get('kind', 'unknown')} model; evaluation takes "
                        "detectors")
    reading = EvalOptions(int(info["resolution"]), in_channels(info), info.get("normalize", "imagenet"), batch_size,
                          workers)
    return model.to(device), info, reading


def _score_one(accelerator, opts: EvaluateOptions, checkpoint: str, run: str) -> Scored:
    model, info, reading = load_detector(checkpoint, opts.batch_size, opts.workers, accelerator.device)
    channels, data, split = reading.channels, opts.data, opts.split
    rank, world = accelerator.process_index, accelerator.num_processes
    inputs, heads = model_io(info["model"])

    def score(which: str, perturb=None) -> Predictions:
        return predict(accelerator, model, eval_loader(data, which, reading, rank, world, perturb), inputs, heads)

    main = accelerator.is_main_process
    if main:
        console.print(f"[bold]{run}[/bold]: scoring the {split} split of {', '.join(map(str, data))} on {world} process(es)")
    start = time.perf_counter()
    test = score(split)
    seconds = time.perf_counter() - start
    val = score(opts.val_split) if opts.val_split != split and has_split(data, opts.val_split) else None
    if val is not None and val.labels.min() == val.labels.max():
        val = None  # one class only: no threshold or temperature can be fitted on it
    threshold = M.val_threshold(val.scores, val.labels) if val is not None else None
    thresholds = {"0.5": 0.5, **({"val": threshold} if threshold is not None else {})}
    result = {"metrics": _metrics_pair(test, threshold), "sources": per_source(test, thresholds),
              "calibration": _calibration(test, val), "robustness": []}
    if len(heads) > 1 or has_stream_labels(test):  # sets with sound: video, audio and overall labels
        result["modalities"] = per_modality(test)
        result["categories"] = per_category(test, thresholds)
    videos = video_predictions(test, opts.video_aggregate)
    if videos is not None:
        result["video"] = _video_level(videos, val, opts.video_aggregate)
    if opts.robustness:
        for name, perturb in PERTURBATIONS.items():
            if main:
                console.print(f"  robustness: {name}")
            perturbed = score(split, perturb)
            result["robustness"].append({"perturbation": name, **_metrics_pair(perturbed, threshold)})
    frames = clip_frames(data)
    shapes = {"image": (opts.batch_size, *([frames] if frames else []), channels, reading.resolution, reading.resolution),
              "audio": (opts.batch_size, audio_samples(data) or 1)}
    row = {
        "run": run, "model": info["model"], "checkpoint": str(checkpoint), "split": split,
        **{k: result["metrics"]["0.5"].get(k) for k in SUMMARY_KEYS},
        "val_threshold": threshold,
        **{f"{k}@val": result["metrics"].get("val", {}).get(k) for k in ("accuracy", "precision", "recall", "f1")},
        "params": sum(p.numel() for p in model.parameters()),
        "images_per_s": throughput(accelerator, model, [shapes[name] for name in inputs]),
        "eval_images_per_s": len(test.keys) / max(seconds, 1e-9),
        "test_images": len(test.keys), "val_images": len(val.keys) if val is not None else 0,
        "temperature": result["calibration"].get("temperature"),
        "ece": result["calibration"]["ece"], "ece_scaled": result["calibration"].get("ece_scaled"),
        "world_size": world,
    }
    for modality in result.get("modalities", []):
        if modality["label"] != "overall":
            row[f"auroc_{modality['label']}_stream"] = modality["auroc"]
    if videos is not None:
        at = result["video"]["metrics"]["0.5"]
        row.update(videos=len(videos.keys), video_aggregate=opts.video_aggregate,
                   **{f"video_{k}": at.get(k) for k in ("accuracy", "f1", "auroc")})
    result["row"] = row
    return Scored(str(checkpoint), run, model, info, list(data), reading, test, val, result, videos)


def _store_calibration(scored: Scored, data: list[str], val_split: str) -> None:
    """Write the fitted temperature (and the validation threshold) into the model's JSON."""
    from deepfake_dist.atomic import write_json_atomic

    calibration = scored.result["calibration"]
    if "temperature" not in calibration:
        return
    _, info_file = resolve(scored.checkpoint)
    info = dict(scored.info)
    info["temperature"] = calibration["temperature"]
    info["calibration"] = {"temperature": calibration["temperature"], "val_threshold": scored.result["row"]["val_threshold"],
                           "fitted_on": {"sets": {str(s): load_manifest(s)["id"] for s in data}, "split": val_split},
                           "ece_val": calibration["ece_val"], "ece_val_scaled": calibration["ece_val_scaled"]}
    try:
        write_json_atomic(info_file, info)
    except OSError as e:
        console.print(f"[yellow]could not store the temperature in {info_file} ({e}); it is in results.json[/yellow]")


def evaluate(opts: EvaluateOptions, *, accelerator=None, command: str | None = None) -> dict:
    """Evaluate each exported detector of ``opts.checkpoints`` (run folders or ``.safetensors``)
    on ``split`` of the shard sets ``data``.

    Call it on every rank (``accelerate launch`` or plain python); each rank scores its own
    shards and the predictions are gathered with no sample lost or counted twice. Only the main
    process writes files (into ``out``, default ``default_out``) and fits nothing on ``split``:
    the threshold (``val_threshold``) and the temperature (stored in the model's JSON as
    ``temperature``) come from ``val_split`` of the same sets. ``layer`` overrides each model's
    ``gradcam_layer`` for Grad-CAM and feature maps; ``command`` is recorded in the report.
    Samples made from videos are also pooled per video (``video_aggregate``: mean, max or median
    of their probabilities) into video-level metrics (``videos``, ``video_auroc``, ... in the row).
    Clips with sound and per-stream labels (``fakeavceleb:``) get metrics per modality (the video,
    audio and overall labels, each from the model's head of that name or its only logit:
    ``auroc_video_stream``, ``auroc_audio_stream`` in the row) and per category
    (``evaluation.modalities``).

    Returns ``{"rows": [...], "out": Path, "table_md": str, "results": [...]}``: one row per
    checkpoint with run, model, checkpoint, accuracy, precision, recall, f1 (at 0.5), auroc, ap,
    eer, val_threshold, accuracy@val ... f1@val, params, images_per_s, test_images, ...
    """
    from deepfake_dist.evaluation.compare import comparison_table, markdown_table

    opts = replace(opts, checkpoints=[str(c) for c in opts.checkpoints], data=[str(d) for d in opts.data])
    if not opts.checkpoints:
        raise UserError("evaluate: no --checkpoint given; pass a run folder or model.safetensors")
    if not opts.data:
        raise UserError("evaluate: no --data given; pass shard set folders, e.g. --data shards/real shards/fake")
    for folder in opts.data:
        load_manifest(folder)  # a clear error for a missing or unfinished set, before any work
    if opts.batch_size <= 0:
        raise UserError(f"--batch-size {opts.batch_size}: must be positive")
    aggregate_scores(torch.zeros(1), opts.video_aggregate)  # a bad --video-aggregate fails before any work
    accelerator = accelerator or eval_accelerator()
    out = Path(opts.out) if opts.out is not None else default_out(opts.checkpoints, opts.split)
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    runs = unique_runs(opts.checkpoints)
    scored = [_score_one(accelerator, opts, c, r) for c, r in zip(opts.checkpoints, runs)]
    rows = [s.result["row"] for s in scored]
    table_md = markdown_table(rows)
    if accelerator.is_main_process:
        from deepfake_dist.evaluation.outputs import write_outputs

        out.mkdir(parents=True, exist_ok=True)
        for s in scored:
            _store_calibration(s, opts.data, opts.val_split)
        with out_of_space_is_one_line(f"the evaluation's results in {out}", out, OUTPUTS_WHOLE):
            write_outputs(out, scored, opts.data, opts.split, opts.val_split, command, explain=opts.explain,
                          report=opts.report, layer=opts.layer, table_md=table_md)
        console.print(comparison_table(rows))
        console.print(f"results in {out}" + (f" (open {out / 'index.html'})" if opts.report else ""))
    accelerator.wait_for_everyone()
    return {"rows": rows, "out": out, "table_md": table_md, "results": [s.result for s in scored]}
