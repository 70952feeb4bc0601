"""Metrics per source: each generator's fakes and each real source, read from the samples' json.

A group's own accuracy is its recall (fakes) or specificity (reals) and needs no other class; its
ROC-AUC is measured against every sample of the other class, which is the usual "per-generator
AUC" (how well this generator's fakes are told from all real faces).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from deepfake_dist.data.common import LABEL_NAMES
from deepfake_dist.evaluation.metrics import binary_metrics
from deepfake_dist.evaluation.predictions import Predictions


def source_name(key: str, meta: dict, label: int) -> str:
    """``fake/<generator>`` or ``real/<source>``; the shard set's folder when the json names none."""
    generator = meta.get("generator")
    name = generator if label == 1 and generator and generator != "unknown" else meta.get("source")
    return f"{LABEL_NAMES[label]}/{name or key.split('/', 1)[0]}"


def per_source(preds: Predictions, thresholds: dict[str, float]) -> list[dict]:
    """One row per source, sorted by name: ``source``, ``label``, ``samples``, ``mean_score``,
    ``accuracy@NAME`` for each named threshold, and ``auroc_vs_other`` (against the other class)."""
    scores, labels = preds.scores, preds.labels
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (key, meta, label) in enumerate(zip(preds.keys, preds.metas, labels.tolist())):
        groups[source_name(key, meta, label)].append(i)
    rows = []
    for name in sorted(groups):
        index = torch.tensor(groups[name])
        label = int(labels[index[0]])
        s = scores[index]
        row = {"source": name, "label": LABEL_NAMES[label], "samples": len(index), "mean_score": float(s.mean())}
        for tag, t in thresholds.items():
            row[f"accuracy@{tag}"] = float(((s > t).long() == label).double().mean())
        other = torch.nonzero(labels != label).flatten()
        if len(other):
            both = torch.cat([index, other])
            row["auroc_vs_other"] = binary_metrics(scores[both], labels[both])["auroc"]
        rows.append(row)
    return rows
