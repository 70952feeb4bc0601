"""The shard reader against Python's ``tarfile`` on mutated shards: random bytes, header fields
(sizes, numbers, types), pax records, truncations. Every read ends, in members or a
``tarfile.ReadError``, within half a second; whatever the reader accepts, ``tarfile`` reads the same
members from; whatever ``tarfile`` refuses (or loops on), the reader refuses. The reader may
refuse more: a damaged header after the first, which ``tarfile`` takes for the end of the
archive, or a pax record ``tarfile`` skips. ``--hypothesis-show-statistics`` shows how often
each outcome came up."""

from __future__ import annotations

import io
import signal
import tarfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from inject import deadline

from deepfake_dist.data.tarstream import tar_members

SECONDS = 0.5  # far above the few milliseconds a read of these small shards takes


def _shard(fmt: int, long_names: bool, global_pax: bool = False) -> tuple[bytes, list[int]]:
    """A small shard in one tar dialect, and the offsets of its headers."""
    buf = io.BytesIO()
    extra = {"pax_headers": {"comment": "made for fuzzing"}} if global_pax else {}
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **extra) as tar:
        for i in range(3):
            key = ("d" * 110 + "/" if long_names else "") + f"s{i}"
            for ext, data in (("cls", b"01"[i % 2:][:1]), ("png", bytes(range(i, 256)) * 3)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw, [offset for offset in range(0, len(raw), 512) if _is_header(raw, offset)]


def _is_header(raw: bytes, offset: int) -> bool:
    try:
        tarfile.TarInfo.frombuf(raw[offset:offset + 512], "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


BASES = [_shard(tarfile.PAX_FORMAT, True), _shard(tarfile.GNU_FORMAT, True), _shard(tarfile.USTAR_FORMAT, False),
         _shard(tarfile.PAX_FORMAT, False, global_pax=True)]
FIELDS = {"mode": (100, 108), "uid": (108, 116), "size": (124, 136), "mtime": (136, 148), "type": (156, 157),
          "prefix": (345, 355), "name": (0, 100)}


def _fix_checksum(data: bytearray, offset: int) -> None:
    header = data[offset:offset + 512]
    if len(header) == 512:
        header[148:156] = b" " * 8
        data[offset + 148:offset + 156] = b"%06o\0 " % sum(header)


def _pax_header(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


numbers = st.one_of(
    st.integers(-2 ** 40, 2 ** 40).map(lambda n: (b"%o" % n if n >= 0 else b"-%o" % -n)),
    st.sampled_from([b"", b" ", b"+7", b"1_0", b"0o17", b"1 2", b"\x80" + bytes(10) + b"\x01", b"\xff" * 12,
                     b"\x80" + b"\xff" * 11, b"-0000001000", b"77777777777"]),
    st.binary(max_size=12))
pax_records = st.lists(st.one_of(
    st.tuples(st.sampled_from([b"path", b"size", b"mtime", b"comment", b"GNU.sparse.size", b"hdrcharset"]),
              st.one_of(st.binary(max_size=20), numbers)).map(lambda kv: _pax_record(*kv)),
    st.binary(max_size=30),
    st.sampled_from([b"0 path=x\n", b"5 a=b\n", b"99 size=1\n", b"-5 size=1\n", b"9 size=-1\n", b"06 a=b\n"])),
    max_size=4).map(b"".join)


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"<length> key=value\\n"`` where the length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while length != len(body) + len(str(length)):
        length = len(body) + len(str(length))
    return b"%d" % length + body


@st.composite
def mutated_shards(draw) -> bytes:
    raw, headers = draw(st.sampled_from(BASES))
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["field", "field", "bytes", "pax", "truncate"]))
        offset = draw(st.sampled_from(headers))
        if offset + 512 > len(data):  # cut off by an earlier truncation
            continue
        if how == "field":
            start, end = FIELDS[draw(st.sampled_from(sorted(FIELDS)))]
            value = draw(numbers if end - start in (8, 12) else st.binary(min_size=1, max_size=end - start))
            data[offset + start:offset + end] = value[:end - start].ljust(end - start, b"\0")
        elif how == "bytes":
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(offset, offset + 511) if draw(st.booleans()) else st.integers(0, len(data) - 1))
                data[at:at + 1] = bytes([draw(st.integers(0, 255))])
        elif how == "pax":
            data[offset:offset] = _pax_header(draw(pax_records))
        else:
            del data[draw(st.integers(0, len(data))):]
        if draw(st.integers(0, 3)):  # most mutations made past the checksum, as a crafted shard would be
            _fix_checksum(data, offset)
    return bytes(data)


def _tarfile_members(path) -> list[tuple[str, bytes]] | str:
    """What ``tarfile`` reads (regular files, as WebDataset takes them), or how it failed."""
    try:
        with deadline(SECONDS), tarfile.open(path, "r:") as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    except TimeoutError:
        return "hangs"
    except Exception as err:  # noqa: BLE001 - ReadError, but also ValueError, OverflowError, EOFError...
        return type(err).__name__


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(shard=mutated_shards())
def test_mutated_shards_end_and_agree_with_tarfile(tmp_path, shard):
    path = tmp_path / "fuzzed.tar"
    path.write_bytes(shard)
    theirs = _tarfile_members(path)
    ours: list[tuple[str, bytes]] = []
    try:
        with deadline(SECONDS):
            ours.extend(tar_members(path, chunk=1024))
    except tarfile.ReadError:
        event(f"reader refuses, tarfile {'reads' if isinstance(theirs, list) else theirs}")
        return
    except TimeoutError:
        pytest.fail("the shard reader did not end")
    event("both read" if isinstance(theirs, list) else f"reader reads, tarfile {theirs}")
    assert ours == theirs  # read alike, or both refused: never accepted by one alone
