"""Video-level scores: the samples of one video (its clips, or its frames in a frame-level set)
pooled into one probability of fake, so detectors are also compared on whole videos.

Samples made by ``videos:PATH`` carry their video's id in their json (``video``); a video is
``SET/VIDEO`` (the shard set's folder and that id). Its score is the mean (or max, or median) of
its samples' probabilities; the metrics over videos are then the usual ones
(``metrics.detection_metrics``), and ``evaluate`` reports them beside the clip or frame level.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from deepfake_dist.errors import UserError
from deepfake_dist.evaluation.predictions import Predictions

AGGREGATES = {
    "mean": lambda s: s.mean(),
    "max": lambda s: s.max(),
    "median": lambda s: s.quantile(0.5),  # the midpoint of the two middle scores for an even count
}
PER_SAMPLE = ("clip", "frame", "frames", "boxes", "detected")  # json fields that describe one sample only


def aggregate_scores(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """One video's score from its samples' probabilities of fake."""
    if how not in AGGREGATES:
        raise UserError(f"--video-aggregate {how}: expected one of {', '.join(AGGREGATES)}")
    return AGGREGATES[how](scores.double()).float()


def video_id(key: str, meta: dict) -> str | None:
    """``SET/VIDEO`` for a sample made from a video, else ``None``."""
    video = meta.get("video")
    return None if video is None else f"{key.split('/', 1)[0]}/{video}"


def video_predictions(preds: Predictions, how: str = "mean") -> Predictions | None:
    """One row per video, sorted by id: ``scores`` = the aggregate of its samples' scores (its
    logit is their logit), the samples' label, and the first sample's json without the
    per-sample fields plus ``samples`` (how many were pooled). ``None`` when no sample names a
    video; samples without one are left out."""
    aggregate_scores(torch.zeros(1), how)  # a bad name fails before any work
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (key, meta) in enumerate(zip(preds.keys, preds.metas)):
        vid = video_id(key, meta)
        if vid is not None:
            groups[vid].append(i)
    if not groups:
        return None
    scores, labels, metas = [], [], []
    for vid in sorted(groups):
        index = torch.tensor(groups[vid])
        label = preds.labels[index]
        if label.min() != label.max():
            raise UserError(f"video {vid} has samples labelled both real and fake; re-create its shard set")
        scores.append(aggregate_scores(preds.scores[index], how))
        labels.append(int(label[0]))
        first = preds.metas[groups[vid][0]]
        metas.append({**{k: v for k, v in first.items() if k not in PER_SAMPLE}, "samples": len(index)})
    score = torch.stack(scores).clamp(1e-7, 1 - 1e-7)
    return Predictions(torch.logit(score), torch.tensor(labels, dtype=torch.long), sorted(groups), metas)
