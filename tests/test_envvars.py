"""``temporary_env``: the pipeline's process-group ownership and the safe Inception load rely on
the variable coming back exactly as it was, and on leaving other variables alone."""

from __future__ import annotations

import os

import pytest

from deepfake_dist.envvars import temporary_env


def test_the_variable_is_restored_or_removed_and_others_stay(monkeypatch):
    monkeypatch.setenv("DFD_SET", "before")
    monkeypatch.delenv("DFD_UNSET", raising=False)
    monkeypatch.delenv("DFD_OTHER", raising=False)
    with temporary_env("DFD_SET", "inside"), temporary_env("DFD_UNSET", "1"):
        assert os.environ["DFD_SET"] == "inside" and os.environ["DFD_UNSET"] == "1"
        os.environ["DFD_OTHER"] = "set by a library"
    assert os.environ["DFD_SET"] == "before" and "DFD_UNSET" not in os.environ
    assert os.environ.pop("DFD_OTHER") == "set by a library"
    with pytest.raises(RuntimeError), temporary_env("DFD_SET", "inside"):
        raise RuntimeError
    assert os.environ["DFD_SET"] == "before"  # restored on an error too
