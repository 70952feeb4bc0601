"""The fault-injection suite's fixtures: a private copy of the test shards to damage and the
smoke config pointed at it. The damage itself is in ``inject.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def shard_set(tmp_path, face_shards) -> Path:
    """A copy of the session's ``face_shards`` (6 train shards of 16, 1 val, 1 test) to damage."""
    return Path(shutil.copytree(face_shards, tmp_path / "shards" / "faces"))


@pytest.fixture
def overrides(tmp_path, shard_set) -> list[str]:
    """``configs/smoke.yaml`` overrides: train on ``shard_set``, write under tmp_path, no wandb."""
    return [f"data.train=[{shard_set}]", f"output_dir={tmp_path / 'runs'}", "wandb.mode=disabled"]
