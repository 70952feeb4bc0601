"""Score every sample of an evaluation loader and gather the scores from all ranks.

Each rank reads its own shards (see ``data.loader.EvalStream``) so ranks may hold different
counts. A wrapped model's forward can be collective (DDP syncs buffers, ZeRO-3 gathers
parameters), so a rank that runs out keeps calling it on a throw-away batch until every rank is
done (a "join"). One ``gather_object`` at the end joins the scores; a duplicate key is an error,
which is how we know no sample was counted twice. So is a NaN score: every metric, and the
choice of the best model, would be silently wrong (see ``engine.metrics.binary_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from deepfake_dist.errors import UserError


@dataclass
class Predictions:
    logits: torch.Tensor  # the model's first head (its only one, for most)
    labels: torch.Tensor
    keys: list[str]
    metas: list[dict]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # every head's logits, when it has several

    @property
    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def _all_done(accelerator: Accelerator, done: bool) -> bool:
    if accelerator.num_processes == 1:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def blank_inputs(dataset, inputs: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """One sample of zeros for each input a model takes from an evaluation stream's batches."""
    return tuple(torch.zeros(1, *(dataset.sample_shape if name == "image" else (dataset.audio or 1,)))
                 for name in inputs)


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, loader, inputs: tuple[str, ...] = ("image",),
            heads: tuple[str, ...] = ("overall",)) -> Predictions:
    """Every sample's logits; ``inputs``, ``heads``: what the model takes from a batch and what its
    logits are (``models.model_io``)."""
    model.eval()
    rows = []
    batches = iter(loader)
    spare = blank_inputs(loader.dataset, inputs)
    while True:
        batch = next(batches, None)
        if _all_done(accelerator, batch is None):
            break
        given = spare if batch is None else batch.inputs(inputs)
        with accelerator.autocast():
            logits = model(*(x.to(accelerator.device) for x in given)).float().cpu()
        if batch is not None:
            spare = tuple(x[:1] for x in given)
            rows.extend(zip(logits.reshape(len(batch), -1).tolist(), batch.label.tolist(), batch.key, batch.meta))
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    keys = [r[2] for r in rows]
    if len(set(keys)) != len(keys):
        raise RuntimeError("a sample was scored twice across ranks; the shard split is broken")
    order = sorted(range(len(rows)), key=lambda i: keys[i])  # independent of the number of ranks
    rows = [rows[i] for i in order]
    _refuse_nan([r[2] for r in rows if any(v != v for v in r[0])], len(rows))  # NaN is the one value unequal to itself
    logits = torch.tensor([r[0] for r in rows]).reshape(len(rows), len(heads))
    return Predictions(
        logits[:, 0],
        torch.tensor([r[1] for r in rows], dtype=torch.long),
        [r[2] for r in rows],
        [r[3] for r in rows],
        {name: logits[:, i] for i, name in enumerate(heads)} if len(heads) > 1 else {},
    )


def _refuse_nan(keys: list[str], total: int) -> None:
    if keys:
        raise UserError(f"the model scored NaN for {len(keys)} of {total} samples ({', '.join(keys[:5])}"
                        f"{', ...' if len(keys) > 5 else ''}); metrics over them would be wrong. NaN or inf is in its "
                        "weights or BatchNorm statistics (see train/nonfinite_steps in the run's metrics), or the "
                        "input overflows its precision: use an earlier checkpoint, or set train.mixed_precision=no")
