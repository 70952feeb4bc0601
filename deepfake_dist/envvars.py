"""Environment variables set for a block of code only."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def temporary_env(name: str, value: str):
    """``name=value`` inside the block; afterwards the variable is as it was (or absent again).
    Only this variable is restored: others set inside the block (by a launcher, a library) stay."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
