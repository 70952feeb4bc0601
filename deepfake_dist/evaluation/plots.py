"""PNG figures for the evaluation report (matplotlib's object API with the Agg canvas: no
pyplot state, no display needed). Every function writes one file atomically and returns its path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torchmetrics.functional import classification as C

from deepfake_dist.atomic import atomic_path


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def roc_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """ROC curves, one per ``name -> (scores, labels)``, with each ROC-AUC in the legend."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = C.binary_roc(scores, labels)
        auc = float(C.binary_auroc(scores, labels))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fakes caught)",
           title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """Precision-recall curves (fake = positive), with each average precision in the legend."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    for name, (scores, labels) in curves.items():
        precision, recall, _ = C.binary_precision_recall_curve(scores, labels)
        ap = float(C.binary_average_precision(scores, labels))
        ax.plot(recall.numpy(), precision.numpy(), label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def confusion_plot(matrices: dict[str, list[list[int]]], path: Path) -> Path:
    """One confusion matrix per title (rows: truth, columns: verdict), counts in the cells."""
    fig = Figure(figsize=(3.6 * len(matrices), 3.4))
    for i, (title, matrix) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), i + 1)
        m = np.asarray(matrix)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1))
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["real", "fake"], yticklabels=["real", "fake"],
               xlabel="verdict", ylabel="truth", title=title)
    return _save(fig, path)


def training_curves(records: list[dict], path: Path) -> Path | None:
    """Training loss and every validation metric against the step, from a run's metrics.jsonl
    records; None when the records hold neither."""
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for key, value in r.items():
            if (key == "train/loss" or key.startswith("val/")) and isinstance(value, (int, float)) \
                    and key != "val/samples":
                xs, ys = series.setdefault(key, ([], []))
                xs.append(r["step"])
                ys.append(value)
    if not series:
        return None
    val = sorted(k for k in series if k.startswith("val/"))
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    for key in [k for k in ("train/loss", "val/loss") if k in series]:
        ax.plot(*series[key], marker="." if key.startswith("val") else None, label=key)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for key in [k for k in val if k != "val/loss"]:
        ax.plot(*series[key], marker=".", label=key)
    ax.set(xlabel="step", title="validation metrics", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability_plot(curves: dict[str, list[dict]], path: Path) -> Path:
    """Reliability diagram: observed fraction of fakes against the mean predicted probability per
    bin (see ``metrics.reliability``), for each ``name -> bins``; the diagonal is perfect."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfectly calibrated")
    for name, bins in curves.items():
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["fraction_fake"] for b in used], marker="o", label=name)
    ax.set(xlabel="predicted probability of fake", ylabel="observed fraction of fakes", title="Reliability",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def image_grid(images: list, titles: list[str], path: Path, columns: int = 6, title: str = "") -> Path:
    """PIL images (or arrays) in a grid, each with its caption."""
    rows = max(math.ceil(len(images) / columns), 1)
    fig = Figure(figsize=(1.9 * columns, 2.1 * rows))
    for i, (image, caption) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(np.asarray(image), cmap="gray")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def feature_maps_plot(maps: torch.Tensor, path: Path, title: str, limit: int = 16) -> Path:
    """The first ``limit`` channels of one activation map (C, h, w), each in its own range."""
    maps = maps.detach().float().cpu()[:limit]
    return image_grid([m.numpy() for m in maps], [f"channel {i}" for i in range(len(maps))], path,
                      columns=min(8, len(maps)), title=title)


def matrix_heatmap(panels: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[str], columns: list[str], path: Path,
                   title: str) -> Path:
    """A cross-generator matrix, one panel per ``metric name -> (means, stds)`` (rows: trained on,
    columns: tested on), each cell's mean and spread written in it; a row tested on its own
    generator (the diagonal) is outlined."""
    fig = Figure(figsize=(1.6 + 1.5 * len(columns) * len(panels), 1.4 + 0.7 * len(rows)))
    for i, (name, (means, stds)) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        image = ax.imshow(means, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for (r, c), value in np.ndenumerate(means):
            spread = f"\n±{stds[r, c]:.2f}" if stds[r, c] > 0 else ""
            ax.text(c, r, f"{value:.2f}{spread}", ha="center", va="center", fontsize=8)
            if rows[r] == columns[c]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, linewidth=2))
        ax.set(xticks=range(len(columns)), yticks=range(len(rows)), xlabel="tested on", ylabel="trained on", title=name)
        ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
        ax.set_yticklabels(rows, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
