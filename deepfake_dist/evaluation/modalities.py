"""Metrics per modality and per FakeAVCeleb category, for sets whose clips carry a sound and
per-stream labels (``fakeavceleb:``; ``data.audio``).

A clip has three labels: ``overall`` (its ``cls``), ``video`` and ``audio`` (json ``label_video``,
``label_audio``; the overall label where the set gives none). Each is scored with the model's
head of that name when it has one (``av``: overall, video, audio) and with its only logit
otherwise (an image or clip model, or the ``audio`` model), so the per-modality table reads the
same for every detector: how well does this model tell fake frames (video), fake sound (audio),
any fake (overall)? A clip without sound (json ``audio: false``) does not count for the audio label.

Per category (json ``category``: RealVideo-RealAudio, RealVideo-FakeAudio, ...): the share of
the category's clips called correctly from the overall score, and the ROC-AUC of that category
against the real clips (``overall`` label 0) of the same split.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from deepfake_dist.evaluation.metrics import binary_metrics
from deepfake_dist.evaluation.predictions import Predictions

LABELS = ("overall", "video", "audio")


def head_targets(preds: Predictions, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, counted) of every sample for ``label``: ``overall`` is the sample's label,
    ``video``/``audio`` its json ``label_video``/``label_audio`` ("real"/"fake", the sample's label
    when absent); a sample without sound is not counted for ``audio``."""
    if label == "overall":
        return preds.labels, torch.ones(len(preds.labels), dtype=torch.bool)
    field = f"label_{label}"
    labels = [int(m[field] == "fake") if field in m else int(y) for m, y in zip(preds.metas, preds.labels.tolist())]
    counted = [label != "audio" or m.get("audio", True) is not False for m in preds.metas]
    return torch.tensor(labels, dtype=torch.long), torch.tensor(counted, dtype=torch.bool)


def head_scores(preds: Predictions, label: str) -> torch.Tensor:
    """P(fake) for ``label``: the head of that name, else the model's first (or only) logit."""
    return torch.sigmoid(preds.heads[label]) if label in preds.heads else preds.scores


def has_stream_labels(preds: Predictions) -> bool:
    return any("label_video" in m or "label_audio" in m or "audio" in m for m in preds.metas)


def per_modality(preds: Predictions, threshold: float = 0.5) -> list[dict]:
    """One row per label (overall, video, audio): which score was used (``head``), samples,
    fakes, accuracy at ``threshold``, ROC-AUC and AP (None with one class only)."""
    rows = []
    for label in LABELS:
        labels, counted = head_targets(preds, label)
        scores = head_scores(preds, label)[counted]
        labels = labels[counted]
        metrics = binary_metrics(scores, labels, threshold) if len(labels) else {}
        rows.append({"label": label, "head": label if label in preds.heads else "the model's logit",
                     "samples": int(len(labels)), "fakes": int(labels.sum()), "accuracy": metrics.get("accuracy"),
                     "auroc": metrics.get("auroc"), "ap": metrics.get("ap")})
    return rows


def per_category(preds: Predictions, thresholds: dict[str, float]) -> list[dict]:
    """One row per category (json ``category``), sorted: samples, its label, ``accuracy@NAME`` for
    each named threshold of the overall score, and ``auroc_vs_real`` (fake categories)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, meta in enumerate(preds.metas):
        if "category" in meta:
            groups[meta["category"]].append(i)
    scores, labels = preds.scores, preds.labels
    real = torch.nonzero(labels == 0).flatten()
    rows = []
    for name in sorted(groups):
        index = torch.tensor(groups[name])
        label = int(labels[index[0]])
        row = {"category": name, "label": ("real", "fake")[label], "samples": len(index),
               "mean_score": float(scores[index].mean())}
        for tag, t in thresholds.items():
            row[f"accuracy@{tag}"] = float(((scores[index] > t).long() == labels[index]).double().mean())
        if label == 1 and len(real):
            both = torch.cat([index, real])
            row["auroc_vs_real"] = binary_metrics(scores[both], labels[both])["auroc"]
        rows.append(row)
    return rows
