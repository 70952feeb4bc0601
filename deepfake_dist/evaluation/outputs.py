"""Everything an evaluation writes (main process only): predictions and results files, the
comparison and robustness tables, the figures, Grad-CAM overlays, feature maps and the report."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from deepfake_dist.atomic import write_json_atomic, write_text_atomic
from deepfake_dist.data.loader import eval_loader
from deepfake_dist.data.manifest import load_manifest, split_count
from deepfake_dist.data.transforms import denormalize
from deepfake_dist.engine.tracking import read_jsonl
from deepfake_dist.evaluation import plots
from deepfake_dist.evaluation.compare import csv_text
from deepfake_dist.evaluation.gradcam import find_layer, gradcam, overlay
from deepfake_dist.evaluation.sound import sound_figures
from deepfake_dist.evaluation.sources import source_name
from deepfake_dist.models import model_io

EXAMPLES_PER_CLASS = 6  # Grad-CAM grid: this many real and this many fake test images


def predictions_csv(scored) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "label", "logit", "score", "source"])
    p = scored.test
    for key, label, logit, score, meta in zip(p.keys, p.labels.tolist(), p.logits.tolist(), p.scores.tolist(), p.metas):
        writer.writerow([key, label, repr(logit), repr(score), source_name(key, meta, label)])
    return buffer.getvalue()


def robustness_csv(scored: list) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = ("accuracy", "precision", "recall", "f1", "auroc", "ap", "eer")
    writer.writerow(["run", "perturbation", *keys, "accuracy@val", "f1@val"])
    for s in scored:
        clean = {"perturbation": "none", **s.result["metrics"]}
        for r in [clean, *s.result["robustness"]]:
            at_val = r.get("val", {})
            writer.writerow([s.run, r["perturbation"], *(r["0.5"].get(k, "") for k in keys),
                             at_val.get("accuracy", ""), at_val.get("f1", "")])
    return buffer.getvalue()


def _examples(scored, per_class: int, names: tuple[str, ...] = ("image",)):
    """The first ``per_class`` real and fake test samples (shard order), as one batch of the
    model's inputs ``names``."""
    picked = {0: [], 1: []}
    for batch in eval_loader(scored.data, scored.result["row"]["split"], replace(scored.reading, num_workers=0)):
        for i, (label, key) in enumerate(zip(batch.label.tolist(), batch.key)):
            if len(picked[label]) < per_class:
                picked[label].append((tuple(x[i] for x in batch.inputs(names)), label, key))
        if all(len(v) == per_class for v in picked.values()):
            break
    chosen = picked[0] + picked[1]
    inputs = tuple(torch.stack(parts) for parts in zip(*(c[0] for c in chosen)))
    return inputs, [c[1] for c in chosen], [c[2] for c in chosen]


def explain_figures(out: Path, scored, layer: str | None) -> dict[str, str]:
    """A Grad-CAM grid of real and fake test images and the feature maps of ``layer`` (for a
    detector that hears, its frames' and spectrograms' maps: ``evaluation.sound``)."""
    model = scored.model
    device = next(model.parameters()).device
    names, heads = model_io(scored.info["model"])
    inputs, labels, keys = _examples(scored, EXAMPLES_PER_CLASS, names)
    if names != ("image",):
        return sound_figures(out, scored, tuple(x.to(device) for x in inputs), labels, keys, names, heads, layer)
    name, module = find_layer(model, layer)
    images = inputs[0].to(device)
    score = dict(zip(scored.test.keys, scored.test.scores.tolist()))
    heat = gradcam(model, images, name)
    shown = denormalize(images, scored.info.get("normalize", "imagenet")).cpu()
    if images.ndim == 5:  # clips: each clip's middle frame with its own map
        middle = images.shape[1] // 2
        shown, heat = shown[:, middle], heat[:, middle]
    overlays = [overlay(img, h) for img, h in zip(shown, heat)]
    titles = [f"{('real', 'fake')[y]} p(fake)={score[k]:.2f}" for y, k in zip(labels, keys)]
    figures = {"gradcam": plots.image_grid(
        overlays, titles, out / f"gradcam-{scored.run}.png", columns=EXAMPLES_PER_CLASS,
        title=f"Grad-CAM on {name} (top: real, bottom: fake; each map explains the model's verdict)").name}
    captured = {}
    hook = module.register_forward_hook(lambda m, i, o: captured.setdefault("maps", o.detach()))
    try:
        with torch.no_grad():
            model(images[-1:])  # a fake example
    finally:
        hook.remove()
    maps = captured.get("maps")
    if isinstance(maps, torch.Tensor) and maps.ndim == 4:
        figures["features"] = plots.feature_maps_plot(
            maps[0], out / f"features-{scored.run}.png", f"feature maps of {name} ({keys[-1]})").name
    return figures


def model_card(scored) -> dict:
    info, model = scored.info, scored.model
    children = [(f"features.{n}", m) for n, m in model.features.named_children()] if hasattr(model, "features") else []
    children += [("classifier", model.classifier)] if hasattr(model, "classifier") else []
    manifests = []
    for path, manifest_id in info.get("manifests", {}).items():
        entry = {"path": path, "id": manifest_id}
        try:
            manifest = load_manifest(path)
            entry.update(source=manifest.get("source"), counts=manifest.get("counts"),
                         matches=manifest.get("id") == manifest_id)
        except Exception:  # noqa: BLE001 - the card still lists the id of a set that moved
            entry["note"] = "manifest not found here"
        manifests.append(entry)
    return {
        "model": info["model"], "model_args": info.get("model_args", {}), "build_args": info.get("build_args", {}),
        "resolution": info.get("resolution"), "normalize": info.get("normalize"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradcam_layer": getattr(model, "gradcam_layer", None),
        "modules": [{"name": n, "type": type(m).__name__, "parameters": sum(p.numel() for p in m.parameters())}
                    for n, m in children],
        "manifests": manifests, "step": info.get("step"), "val_metrics": info.get("val_metrics", {}),
        "package_version": info.get("package_version"),
        "config_yaml": yaml.safe_dump(info.get("config", {}), sort_keys=False),
    }


def _run_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def write_outputs(out: Path, scored: list, data: list[str], split: str, val_split: str, command: str, *,
                  explain: bool, report: bool, layer: str | None, table_md: str) -> None:
    from deepfake_dist.evaluation.report import write_report

    rows = [s.result["row"] for s in scored]
    figures = {}
    curves = {s.run: (s.test.scores, s.test.labels) for s in scored if s.test.labels.min() != s.test.labels.max()}
    if curves:
        figures["roc"] = plots.roc_plot(curves, out / "roc.png").name
        figures["pr"] = plots.pr_plot(curves, out / "pr.png").name
    for s in scored:
        figs = {}
        matrices = {"threshold 0.5": s.result["metrics"]["0.5"]["confusion"]}
        if "val" in s.result["metrics"]:
            matrices[f"threshold {s.result['row']['val_threshold']:.3f} (chosen on {val_split})"] = \
                s.result["metrics"]["val"]["confusion"]
        figs["confusion"] = plots.confusion_plot(matrices, out / f"confusion-{s.run}.png").name
        calibration = s.result["calibration"]
        reliability = {"as trained": calibration["bins"]}
        if "bins_scaled" in calibration:
            reliability[f"temperature {calibration['temperature']:.2f}"] = calibration["bins_scaled"]
        figs["reliability"] = plots.reliability_plot(reliability, out / f"reliability-{s.run}.png").name
        jsonl = _run_dir(s.checkpoint) / "metrics.jsonl"
        if jsonl.is_file():
            drawn = plots.training_curves(read_jsonl(jsonl), out / f"curves-{s.run}.png")
            if drawn is not None:
                figs["curves"] = drawn.name
        if explain:
            figs.update(explain_figures(out, s, layer))
        s.result["figures"] = figs
        s.result["card"] = model_card(s)
        write_text_atomic(out / f"predictions-{s.run}.csv", predictions_csv(s))
        if s.videos is not None:  # one row per video (key SET/VIDEO, score pooled over its samples)
            write_text_atomic(out / f"videos-{s.run}.csv", predictions_csv(replace(s, test=s.videos)))
    write_text_atomic(out / "comparison.md", table_md)
    write_text_atomic(out / "comparison.csv", csv_text(rows))
    if any(s.result["robustness"] for s in scored):
        write_text_atomic(out / "robustness.csv", robustness_csv(scored))
    sets = []
    for folder in data:
        manifest = load_manifest(folder)
        sets.append({"path": folder, "id": manifest["id"], "source": manifest.get("source"),
                     split: split_count(manifest, split), val_split: split_count(manifest, val_split)})
    summary = {"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "split": split,
               "val_split": val_split, "world_size": rows[0]["world_size"], "data": sets, "figures": figures,
               "runs": [{"run": s.run, "checkpoint": s.checkpoint, **s.result} for s in scored]}
    write_json_atomic(out / "results.json", summary, indent=1)
    if report:
        write_report(out, summary)
