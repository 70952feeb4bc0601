"""Binary detection metrics (fake = positive class) computed with torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics.functional import classification as C


def binary_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 at ``threshold``; ROC-AUC and AP from the scores."""
    scores, labels = scores.float().cpu(), labels.long().cpu()
    out = {
        "accuracy": C.binary_accuracy(scores, labels, threshold=threshold),
        "precision": C.binary_precision(scores, labels, threshold=threshold),
        "recall": C.binary_recall(scores, labels, threshold=threshold),
        "f1": C.binary_f1_score(scores, labels, threshold=threshold),
    }
    if labels.min() != labels.max():  # ranking metrics need both classes
        out["auroc"] = C.binary_auroc(scores, labels)
        out["ap"] = C.binary_average_precision(scores, labels)
    return {k: float(v) for k, v in out.items()}
