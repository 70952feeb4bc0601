"""What the cross-generator matrix (``evaluation.matrix``) writes on the main process: ``matrix.md``
and ``matrix.csv`` (ROC-AUC and AP; rows: trained on, columns: tested on; each row's off-diagonal
mean), ``matrix.json`` (every run, seed and cell), the heatmap ``matrix.png``, a report
(``report.md`` and the self-contained ``index.html``) and a wandb run; and the tables on the console."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from deepfake_dist.atomic import write_json_atomic, write_text_atomic
from deepfake_dist.console import console
from deepfake_dist.evaluation import plots
from deepfake_dist.evaluation.matrix import AIM, METRICS
from deepfake_dist.evaluation.report import render_html, render_markdown

SAW_ALL = "n/a (saw all)"


def _f(spread: dict) -> str:
    """``mean ± std`` over the seeds (the mean alone for one seed)."""
    return f"{spread['mean']:.3f}" + (f" ± {spread['std']:.3f}" if len(spread["seeds"]) > 1 else "")


def title(summary: dict, metric: str) -> str:
    seeds = summary["seeds"]
    over = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    return (f"Cross-generator matrix, {METRICS[metric]}: {summary['detector']} ({summary['config']}) on the "
            f"{summary['split']} split, {over}")


def cells(summary: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of one metric's matrix (Markdown, console and report)."""
    columns, off = summary["columns"], summary["off_diagonal"][metric]
    headers = ["trained on \\ tested on", *columns, "off-diagonal mean"]
    rows = [[row, *(_f(summary["cells"][metric][row][c]) for c in columns), _f(off[row]) if row in off else SAW_ALL]
            for row in summary["rows"]]
    return headers, rows


def notes(summary: dict) -> list[str]:
    """What each column holds, and the detector's figures against the aim."""
    images = summary["images"]
    reals = next(iter(images.values()))["real"]
    fakes = ", ".join(f"{c} {n['fake']}" for c, n in images.items())
    auc = summary["overall"]["auroc"]
    verdict = "met" if summary["aim_met"] else "missed"
    return [(f"Each column: the {summary['split']} split of {summary['real']} ({reals} real images, the same in every "
             f"column) with that generator's {summary['split']} split ({fakes} fakes). A row's detector trained "
             "and chose its model (validation split) on the real set and its row's fake set(s) alone."),
            (f"Diagonal mean ROC-AUC {_f(auc['diagonal'])}, off-diagonal mean ROC-AUC {_f(auc['off_diagonal'])} "
             f"(single-generator rows; aim: diagonal >= {AIM['diagonal']}, off-diagonal >= {AIM['off_diagonal']}: "
             f"{verdict}).")]


def markdown(summary: dict) -> str:
    parts = []
    for metric in METRICS:
        headers, rows = cells(summary, metric)
        parts += [f"**{title(summary, metric)}**", "", "| " + " | ".join(headers) + " |",
                  "|---|" + "---:|" * (len(headers) - 1), *("| " + " | ".join(r) + " |" for r in rows), ""]
    return "\n".join(parts + ["\n\n".join(notes(summary))]) + "\n"


def csv_text(summary: dict) -> str:
    """Plain numbers: per metric, one matrix per seed and then the mean and std over the seeds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = summary["columns"]
    writer.writerow(["metric", "seed", "trained_on", *columns, "off_diagonal_mean"])
    for metric in METRICS:
        grid, off = summary["cells"][metric], summary["off_diagonal"][metric]
        for i, seed in enumerate([*summary["seeds"], "mean", "std"]):
            def value(spread: dict) -> float:
                return spread["seeds"][i] if i < len(summary["seeds"]) else spread[seed]

            for row in summary["rows"]:
                writer.writerow([metric, seed, row, *(value(grid[row][c]) for c in columns),
                                 value(off[row]) if row in off else ""])
    return buffer.getvalue()


def heatmap(out: Path, summary: dict) -> Path:
    rows, columns = summary["rows"], summary["columns"]
    panels = {METRICS[m]: tuple(np.array([[summary["cells"][m][r][c][k] for c in columns] for r in rows])
                                for k in ("mean", "std")) for m in METRICS}
    seeds = len(summary["seeds"])
    return plots.matrix_heatmap(panels, rows, columns, out / "matrix.png",
                                f"{summary['detector']} on the {summary['split']} split"
                                f"{f', mean ± std over {seeds} seeds' if seeds > 1 else ''}")


def report_blocks(summary: dict, png: str) -> list:
    runs = [[Path(r["run"]).name, r["row"], str(r["seed"]), ", ".join(r["manifests"]),
             f"{r['val_auroc']:.4f}" if r.get("val_auroc") is not None else "n/a", str(r["step"])]
            for r in summary["runs"]]
    items: list = [("h1", f"Cross-generator matrix: {summary['detector']}"),
                   ("h2", "Command"), ("code", summary["command"] or "(library call)")]
    for metric in METRICS:
        items += [("h2", METRICS[metric]), ("p", title(summary, metric)), ("table", *cells(summary, metric))]
    items += [*(("p", n) for n in notes(summary)), ("img", png, "the matrix as a heatmap"),
              ("h2", "Runs"), ("p", "Every detector, what it trained on (the shard sets in its model.json), its "
                                    "validation ROC-AUC at export and the step it was exported at."),
              ("table", ["run", "row", "seed", "trained on", "val ROC-AUC", "step"], runs),
              ("h2", "How to read this report"),
              ("p", "Fake is the positive class. The diagonal (outlined in the heatmap) is a detector tested on the "
                    "generator it was trained on; the off-diagonal cells are generators it never saw, the field's "
                    "measure of generalization. ROC-AUC and AP do not depend on a threshold; 0.5 ROC-AUC is chance.")]
    return items


def log_to_wandb(out: Path, summary: dict, png: Path, wandb_cfg) -> None:
    """The matrices (wandb Tables), the heatmap and the detector's figures as a run of its own."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    config = {k: summary[k] for k in ("detector", "config", "real", "fakes", "split", "seeds")}
    with wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, dir=str(out),
                    name=f"matrix-{summary['detector']}", job_type="matrix", config=config) as run:
        tables = {}
        for metric in METRICS:
            headers, rows = cells(summary, metric)
            tables[f"matrix/{metric}"] = wandb.Table(columns=headers, data=rows)
        run.log({**tables, "matrix/heatmap": wandb.Image(str(png))})
        for metric in METRICS:
            for which, spread in summary["overall"][metric].items():
                run.summary[f"{which}/{metric}"] = spread["mean"]
                run.summary[f"{which}/{metric}_std"] = spread["std"]


def write_matrix(out: Path, summary: dict, wandb_cfg=None) -> list[Path]:
    """Every file of the matrix into ``out``; a wandb run unless ``wandb_cfg`` is None or disabled."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "matrix.md", markdown(summary))
    write_text_atomic(out / "matrix.csv", csv_text(summary))
    write_json_atomic(out / "matrix.json", summary, indent=1)
    png = heatmap(out, summary)
    items = report_blocks(summary, png.name)
    write_text_atomic(out / "report.md", render_markdown(items))
    write_text_atomic(out / "index.html", render_html(items, out))
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        log_to_wandb(out, summary, png, wandb_cfg)
    return [out / name for name in ("matrix.md", "matrix.csv", "matrix.json", "matrix.png", "index.html")]


def print_matrix(summary: dict) -> None:
    for metric in METRICS:
        headers, rows = cells(summary, metric)
        table = Table(title=escape(title(summary, metric)), title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(escape(header), justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    for note in notes(summary):
        console.print(escape(note), soft_wrap=True)
