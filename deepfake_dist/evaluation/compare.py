"""The comparison table of several detectors, as a rich ``Table`` (console), Markdown and CSV.

Accuracy, precision, recall and F1 are at the fixed threshold 0.5; the ``@val`` columns are at
the threshold chosen on the validation split (never on the test split); ROC-AUC, AP and EER do
not depend on a threshold. Each table says so in its title.

``rich_table``, ``markdown`` and ``csv_rows`` render any rows under any ``(key, header, format)``
columns, so every table of the evaluation (``evaluation.cross_dataset`` too) looks the same.
"""

from __future__ import annotations

import csv
import io

from rich.table import Table

TITLE = "Detectors on {split} ({images} images): metrics at threshold 0.5; @val = at the threshold chosen on validation"

# (row key, header, format)
COLUMNS = [
    ("run", "run", "{}"),
    ("model", "model", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("precision", "precision", "{:.4f}"),
    ("recall", "recall", "{:.4f}"),
    ("f1", "F1", "{:.4f}"),
    ("auroc", "ROC-AUC", "{:.4f}"),
    ("ap", "AP", "{:.4f}"),
    ("eer", "EER", "{:.4f}"),
    ("val_threshold", "threshold@val", "{:.4f}"),
    ("accuracy@val", "accuracy@val", "{:.4f}"),
    ("f1@val", "F1@val", "{:.4f}"),
    ("params", "parameters", "{:,}"),
    ("images_per_s", "images/s", "{:.1f}"),
]
# Shown when some row was scored on samples made from videos (``evaluation.video``).
VIDEO_COLUMNS = [
    ("videos", "videos", "{}"),
    ("video_accuracy", "video accuracy", "{:.4f}"),
    ("video_f1", "video F1", "{:.4f}"),
    ("video_auroc", "video ROC-AUC", "{:.4f}"),
]

# Shown when some row was scored on clips with per-stream labels (``evaluation.modalities``).
MODALITY_COLUMNS = [
    ("auroc_video_stream", "fake-frames ROC-AUC", "{:.4f}"),
    ("auroc_audio_stream", "fake-sound ROC-AUC", "{:.4f}"),
]


TEXT = ("run", "model")  # left-aligned columns; the rest are numbers


def columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    return (COLUMNS + (VIDEO_COLUMNS if any(r.get("videos") for r in rows) else [])
            + (MODALITY_COLUMNS if any("auroc_audio_stream" in r for r in rows) else []))


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None else fmt.format(value)


def title(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    return TITLE.format(split=first.get("split", "test"), images=first.get("test_images", "?"))


def rich_table(heading: str, cols: list[tuple[str, str, str]], rows: list[dict], text: tuple[str, ...] = TEXT) -> Table:
    """A rich ``Table`` of ``rows`` under ``cols``; a missing value reads n/a."""
    table = Table(title=heading, title_justify="left")
    for key, header, _ in cols:
        table.add_column(header, justify="left" if key in text else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in cols))
    return table


def markdown(heading: str, cols: list[tuple[str, str, str]], rows: list[dict], text: tuple[str, ...] = TEXT) -> str:
    """A Markdown table of ``rows`` under ``cols``, its heading in bold above it."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k in text else "---:" for k, _, _ in cols) + "|",
             *("| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows)]
    return "\n".join([f"**{heading}**", "", *lines]) + "\n"


def csv_rows(cols: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """Plain numbers (no formatting) under the row keys, for spreadsheets and scripts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([k for k, _, _ in cols])
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row[k] for k, _, _ in cols])
    return buffer.getvalue()


def comparison_table(rows: list[dict]) -> Table:
    """A rich ``Table``: run, model, accuracy, precision, recall, F1, ROC-AUC, AP, EER, the
    validation threshold and the metrics there, parameters and inference images/s."""
    return rich_table(title(rows), columns(rows), rows)


def cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells, for the Markdown and HTML report."""
    return [h for _, h, _ in columns(rows)], [[_cell(r, k, f) for k, _, f in columns(rows)] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    return markdown(title(rows), columns(rows), rows)


def csv_text(rows: list[dict]) -> str:
    return csv_rows(columns(rows), rows)
