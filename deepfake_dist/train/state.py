"""Where a run stands: the counters a checkpoint's ``trainer_state.json`` holds (JSON, not a
pickle), so a resumed run continues at the same batch with the same best model, fault counts
and metrics records."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

FAULT_KEYS = ("skipped_samples", "unreadable_shards", "nonfinite_steps")


@dataclass
class RunState:
    epoch: int = 0
    step: int = 0  # optimizer steps
    batch: int = 0  # batches of this epoch already trained: a resumed run's loader starts after them
    best: Optional[float] = None  # the best validation value of ``train.monitor`` so far
    best_step: Optional[int] = None
    stale_epochs: int = 0  # epochs since ``best`` last improved (early stopping)
    skipped_samples: int = 0  # unreadable samples the loaders skipped, all ranks
    unreadable_shards: int = 0
    nonfinite_steps: int = 0  # batches skipped for a NaN/inf loss
    # records in metrics.jsonl when the checkpoint was written: a resumed run cuts the file back to
    # them, so that nothing it logged after the checkpoint appears twice (None: left as it is)
    metrics_lines: Optional[int] = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, values: dict) -> None:
        """Every counter ``values`` holds; any it lacks keeps its start value."""
        for name in (f.name for f in dataclasses.fields(self)):
            if name in values:
                setattr(self, name, values[name])

    def faults(self) -> dict[str, int]:
        """The fault counts, as the trainer logs them."""
        return {key: getattr(self, key) for key in FAULT_KEYS}
