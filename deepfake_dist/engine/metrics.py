"""Binary detection metrics (fake = positive class) computed with torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics.functional import classification as C

from deepfake_dist.errors import UserError


def binary_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 at ``threshold``; ROC-AUC and AP from the scores.
    Scores must be probabilities: given one NaN or one value outside [0, 1], torchmetrics would
    pass every score through a sigmoid and report wrong numbers without a word."""
    scores, labels = scores.float().cpu(), labels.long().cpu()
    outside = torch.nonzero(~((scores >= 0) & (scores <= 1))).flatten().tolist()
    if outside:
        raise UserError(f"{len(outside)} of {scores.numel()} scores are NaN or outside [0, 1] (at index "
                        f"{', '.join(map(str, outside[:5]))}{', ...' if len(outside) > 5 else ''}); metrics need probabilities")
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
