"""The comparison table of several detectors: rich (console), Markdown and CSV."""

from __future__ import annotations


def comparison_table(rows: list[dict]):
    """A rich ``Table``: model, accuracy, precision, recall, F1, ROC-AUC, parameters, images/s."""
    raise NotImplementedError("comparison_table is being written (issue 4)")
