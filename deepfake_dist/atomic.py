"""Files written so a reader sees the old one or the complete new one, never a partial one;
JSON among them always strict."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for the block to write; renamed over ``path`` when the
    block ends, removed when it fails (a full disk, a refused result). The name keeps the
    suffix, which writers such as ``savefig`` read the format from, and the process id, so
    ranks writing the same file do not share it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite(data):
    """``data`` with every NaN or infinite number replaced by None (JSON's null), in nested dicts,
    lists and tuples: a metric that could not be computed, which Python's ``json`` would write as
    ``NaN``, a token that strict JSON readers (browsers, jq) refuse."""
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    if isinstance(data, Real) and not isinstance(data, Integral) and not math.isfinite(data):
        return None
    return data


def json_text(data, indent: int | None = 2) -> str:
    """Strict JSON (non-finite numbers as null, other objects as their ``str``)."""
    return json.dumps(finite(data), indent=indent, default=str, allow_nan=False)


def write_json_atomic(path: str | Path, data, indent: int | None = 2) -> None:
    write_text_atomic(path, json_text(data, indent))
