"""``evaluate``: score exported detectors on shard sets across ranks and write the results."""

from __future__ import annotations

from pathlib import Path


def evaluate(
    checkpoints: list[str],
    data: list[str],
    split: str = "test",
    out: str | Path | None = None,
    *,
    val_split: str = "val",
    robustness: bool = True,
    explain: bool = True,
    report: bool = True,
    batch_size: int = 64,
    accelerator=None,
) -> dict:
    """Evaluate each exported detector (run folder or ``.safetensors``) on ``split`` of ``data``.

    Call it on every rank (``accelerate launch`` or plain python); each rank scores its own
    shards and the predictions are gathered with no sample lost or counted twice. Only the main
    process writes files. Returns ``{"rows": [...], "out": Path, "table_md": str}``, one row per
    checkpoint with model, checkpoint, accuracy, precision, recall, f1, auroc, ap, eer, params,
    images_per_s, test_images (metrics at 0.5; the same at the validation threshold under
    ``val_threshold`` keys).
    """
    raise NotImplementedError("evaluate is being written (issue 4)")
