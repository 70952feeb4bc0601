"""The fast shard reader yields exactly what WebDataset's tar reader yields (long names in every
tar dialect included) and fails loudly on damaged tars."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import webdataset as wds

from deepfake_dist.data.tarstream import _byte_sum, tar_members, tar_samples


def _webdataset(path) -> list[dict]:
    return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
            for s in wds.tarfile_to_samples()([{"url": str(path)}])]


def _ours(path) -> list[dict]:
    return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in tar_samples(path)]


def _write(path, members, fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_platform_shards_read_the_same(face_shards):
    for shard in sorted(face_shards.glob("*.tar")):
        ours = _ours(shard)
        assert ours == _webdataset(shard) and len(ours) > 0
        assert all(s["__url__"] == str(shard) for s in tar_samples(shard))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_folders_and_odd_members(tmp_path, fmt):
    deep = "sub/" + "d" * 120 + "/"  # a ustar prefix, a pax path or a GNU long name, by format
    long_key = deep + "k" * 80 if fmt != tarfile.USTAR_FORMAT else deep + "k" * 60
    members = [("a", None), ("a/x.cls", b"0"), ("a/x.PNG", b"\x89PNG" * 300), ("a/x.json", b"{}"),
               ("__meta__/info.json", b"skip me"), ("noext", b"skip me too"),
               (long_key + ".cls", b"1"), (long_key + ".seg.png", bytes(range(256)) * 7),
               ("y.cls", b""), ("y.png", b"z" * 512)]
    path = tmp_path / "odd.tar"
    _write(path, members, fmt)
    ours = _ours(path)
    assert ours == _webdataset(path)
    assert [s["__key__"] for s in ours] == ["a/x", long_key, "y"]
    assert ours[0]["png"] == b"\x89PNG" * 300 and ours[1]["seg.png"] == bytes(range(256)) * 7 and ours[2]["cls"] == b""


def test_damaged_tars_fail_after_the_good_samples(tmp_path):
    path = tmp_path / "good.tar"
    _write(path, [(f"s{i}.{ext}", bytes([i]) * 700) for i in range(4) for ext in ("cls", "png")])
    data = path.read_bytes()
    member = 512 + 1024  # a header and 700 bytes padded to whole blocks

    cut = tmp_path / "cut.tar"  # cut inside the third sample's image
    cut.write_bytes(data[: member * 5 + 512 + 100])
    read: list[str] = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        read.extend(s["__key__"] for s in tar_samples(cut))
    assert read == ["s0", "s1"]

    between = tmp_path / "between.tar"  # ends after a whole member: no error, fewer samples
    between.write_bytes(data[: member * 4])
    assert [s["__key__"] for s in tar_samples(between)] == ["s0", "s1"]

    garbage = bytearray(data)
    garbage[member * 2 + 10] ^= 0xFF  # a byte of the third member's header
    (tmp_path / "garbage.tar").write_bytes(bytes(garbage))
    with pytest.raises(tarfile.ReadError, match=f"bad header checksum at byte {member * 2}"):
        list(tar_members(tmp_path / "garbage.tar"))

    (tmp_path / "text.tar").write_bytes(b"not a tar at all\n" * 100)
    with pytest.raises(tarfile.ReadError):
        list(tar_members(tmp_path / "text.tar"))
    with pytest.raises(FileNotFoundError):
        list(tar_members(tmp_path / "gone.tar"))


def test_duplicate_member_is_an_error(tmp_path):
    path = tmp_path / "dup.tar"
    _write(path, [("k.png", b"1"), ("k.png", b"2")])
    with pytest.raises(ValueError, match="k.png: duplicate file name"):
        list(tar_samples(path))


def test_members_that_cross_read_chunks_read_the_same(face_shards):
    shard = sorted(face_shards.glob("*.tar"))[0]
    whole = list(tar_members(shard))
    assert list(tar_members(shard, chunk=700)) == whole == list(tar_members(shard, chunk=1))
    with tarfile.open(shard) as tar:
        assert [name for name, _ in whole] == tar.getnames()


def test_the_header_byte_sum_is_exact_up_to_all_ones():
    for block in (bytes(512), b"\xff" * 512, os.urandom(512), b"\xff" * 256 + bytes(256)):
        assert _byte_sum(block) == sum(block)
