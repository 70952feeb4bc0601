"""Score every sample of an evaluation loader and gather the scores from all ranks.

Each rank reads its own shards (see ``data.loader.EvalStream``) so ranks may hold different
counts. A wrapped model's forward can be collective (DDP syncs buffers, ZeRO-3 gathers
parameters), so a rank that runs out keeps calling it on a throw-away batch until every rank is
done (a "join"). One ``gather_object`` at the end joins the scores; a duplicate key is an error,
which is how we know no sample was counted twice. So is a NaN score: every metric, and the
choice of the best model, would be silently wrong (see ``engine.metrics.binary_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from deepfake_dist.errors import UserError


@dataclass
class Predictions:
    logits: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    metas: list[dict]

    @property
    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def _all_done(accelerator: Accelerator, done: bool) -> bool:
    if accelerator.num_processes == 1:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, loader) -> Predictions:
    model.eval()
    rows = []
    batches = iter(loader)
    spare = torch.zeros(1, *loader.dataset.sample_shape)
    while True:
        batch = next(batches, None)
        if _all_done(accelerator, batch is None):
            break
        image = spare if batch is None else batch.image
        with accelerator.autocast():
            logits = model(image.to(accelerator.device)).float().cpu()
        if batch is not None:
            spare = batch.image[:1]
            rows.extend(zip(logits.tolist(), batch.label.tolist(), batch.key, batch.meta))
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    keys = [r[2] for r in rows]
    if len(set(keys)) != len(keys):
        raise RuntimeError("a sample was scored twice across ranks; the shard split is broken")
    order = sorted(range(len(rows)), key=lambda i: keys[i])  # independent of the number of ranks
    rows = [rows[i] for i in order]
    _refuse_nan([r[2] for r in rows if r[0] != r[0]], len(rows))  # NaN is the one value unequal to itself
    return Predictions(
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[1] for r in rows], dtype=torch.long),
        [r[2] for r in rows],
        [r[3] for r in rows],
    )


def _refuse_nan(keys: list[str], total: int) -> None:
    if keys:
        raise UserError(f"the model scored NaN for {len(keys)} of {total} samples ({', '.join(keys[:5])}"
                        f"{', ...' if len(keys) > 5 else ''}); metrics over them would be wrong. NaN or inf is in its "
                        "weights or BatchNorm statistics (see train/nonfinite_steps in the run's metrics), or the "
                        "input overflows its precision: use an earlier checkpoint, or set train.mixed_precision=no")
