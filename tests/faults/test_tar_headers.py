"""Tar headers that step backwards or stand still: a negative size (``-0000001000``, octal with a
sign, or GNU base-256 with 0xff) and a pax record of length 0. The shard reader, ``shards
verify`` and a training run each end with an error naming the shard and the byte offset, never
a loop; training under ``on_error: skip`` counts the shard as unreadable."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from inject import SMOKE, deadline, rewrite_header

from deepfake_dist.cli import main
from deepfake_dist.data.manifest import verify
from deepfake_dist.data.tarstream import tar_members


def _small_tar(path, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(4):
            info = tarfile.TarInfo(f"s{i}.cls")
            info.size = 700
            tar.addfile(info, io.BytesIO(b"0" * 700))
    return path


def _with_pax_record(path, record: bytes):
    """A tar whose first member carries a pax header holding ``record``."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    body = pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
    path.write_bytes(body + _small_tar(path).read_bytes())
    return path


@pytest.mark.parametrize("member", [0, 2])
@pytest.mark.parametrize("size", [b"-0000001000", b"-1", b"\xff" * 12])
def test_a_negative_size_is_an_error_naming_the_offset(tmp_path, member, size):
    path = _small_tar(tmp_path / "neg.tar")
    offset = rewrite_header(path, member, size=size)
    with deadline(5), pytest.raises(tarfile.ReadError, match=f"at byte {offset}"):
        list(tar_members(path))


def test_a_pax_record_of_length_zero_is_an_error(tmp_path):
    for record in (b"0 path=x\n", b"3 path=x\n", b"x\n", b"-5 path=x\n"):
        path = _with_pax_record(tmp_path / "pax.tar", record)
        with deadline(5), pytest.raises(tarfile.ReadError, match="bad pax record .* extended header at byte 0"):
            list(tar_members(path))


def test_shards_verify_names_the_shard_and_offset(shard_set, capsys):
    bad = {"train-000001.tar": rewrite_header(shard_set / "train-000001.tar", 3, size=b"-0000001000"),
           "train-000002.tar": rewrite_header(shard_set / "train-000002.tar", 0, size=b"\x80" + b"\xff" * 11)}
    with deadline(30):
        problems = verify(shard_set)
        assert main(["shards", "verify", str(shard_set)]) == 1
    for name, offset in bad.items():
        assert any(p.startswith(f"{name}: not a readable tar") and f"at byte {offset}" in p for p in problems), problems
    assert "Traceback" not in capsys.readouterr().err


def test_training_counts_the_shard_as_unreadable(shard_set, overrides, tmp_path, capsys):
    shard = shard_set / "train-000003.tar"
    rewrite_header(shard, 0, size=b"-0000001000")
    with deadline(300):
        assert main(["train", "--config", str(SMOKE), *overrides, "train.epochs=1",
                     "checkpoint.every_steps=null"]) == 0
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["unreadable shards"] >= 1
    err = capsys.readouterr().err
    assert f"shard {shard} is unreadable from its start" in err and "at byte 0" in err
