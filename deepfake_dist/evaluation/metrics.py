"""Evaluation metrics beyond ``engine.metrics.binary_metrics``: EER, confusion matrix, the
operating threshold chosen on validation, calibration (ECE, reliability bins) and temperature
scaling. Fake is the positive class; a sample is called fake when its score is ``> threshold``
(torchmetrics' convention), so every threshold here is meant with a strict ``>``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional import classification as C

from deepfake_dist.engine.metrics import binary_metrics

__all__ = ["binary_metrics", "confusion", "detection_metrics", "ece", "eer", "fit_temperature", "reliability",
           "val_threshold"]


def _both_classes(labels: torch.Tensor) -> bool:
    return labels.numel() > 0 and bool(labels.min() != labels.max())


def eer(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Equal error rate: where the false positive rate meets the false negative rate on the ROC
    curve, linearly interpolated between the two ROC points that bracket the crossing."""
    fpr, tpr, _ = C.binary_roc(scores.float().cpu(), labels.long().cpu())
    fpr, fnr = fpr.double(), 1 - tpr.double()
    gap = fpr - fnr  # rises from -1 to +1 along the curve
    i = int(torch.nonzero(gap >= 0)[0])
    if i == 0 or gap[i] == 0:
        return float((fpr[i] + fnr[i]) / 2)
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def confusion(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> list[list[int]]:
    """``[[real->real, real->fake], [fake->real, fake->fake]]`` (rows: truth, columns: verdict)."""
    m = C.binary_confusion_matrix(scores.float().cpu(), labels.long().cpu(), threshold=threshold)
    return m.tolist()


def val_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold that maximises balanced accuracy (Youden's J = TPR - FPR) on these scores.

    Meant for the validation split only. Chosen in float32, the precision the metrics (and the
    server) compare scores in: the midpoint between the ROC point's score and the next lower
    score, or the next float32 below the ROC point's score when the midpoint rounds onto it
    (adjacent scores). So ``score > threshold`` reproduces that ROC point, in float32 and in
    float64 alike (a float32 value is exact in a Python float and in JSON)."""
    fpr, tpr, thresholds = C.binary_roc(scores.float().cpu(), labels.long().cpu())
    i = int(torch.argmax(tpr.double() - fpr.double()))
    upper = thresholds[i]
    threshold = torch.nextafter(upper, torch.tensor(-math.inf, dtype=upper.dtype))
    if i + 1 < len(thresholds):
        middle = ((upper.double() + thresholds[i + 1].double()) / 2).to(upper.dtype)
        threshold = middle if middle < upper else threshold
    return float(threshold)


def detection_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """``binary_metrics`` plus EER, the confusion matrix and the sample counts."""
    out = binary_metrics(scores, labels, threshold)
    if _both_classes(labels):
        out["eer"] = eer(scores, labels)
    out["confusion"] = confusion(scores, labels, threshold)
    out["threshold"] = threshold
    out["samples"] = int(labels.numel())
    out["fakes"] = int(labels.sum())
    return out


def reliability(scores: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width bins of the fake probability: per bin its range, sample count, mean predicted
    probability and observed fraction of fakes (the points of a reliability diagram). The
    binning is torchmetrics' (a score on an edge goes to the upper bin)."""
    scores, labels = scores.double().cpu(), labels.double().cpu()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(scores, edges, right=True) - 1).clamp(0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                    "confidence": float(scores[mask].mean()) if n else None,
                    "fraction_fake": float(labels[mask].mean()) if n else None})
    return out


def ece(scores: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width bins) of the fake probability, torchmetrics."""
    return float(C.binary_calibration_error(scores.float().cpu(), labels.long().cpu(), n_bins=bins, norm="l1"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the cross-entropy of ``sigmoid(logits / T)`` (Guo et al.
    2017); fit it on validation predictions. Monotone, so rankings and the 0.5 verdict stay."""
    logits, target = logits.double().cpu(), labels.double().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp().clamp(0.01, 100.0))
