"""Read a shard's samples fast: the tar headers parsed straight from a buffered stream.

``tarfile`` (which ``webdataset.tarfile_to_samples`` streams through) builds a ``TarInfo`` with
every field decoded for each member; for small 64-px images that costs as much as decoding the
image (benchmarks/loader.py: the pipeline ran at 0.56 of the in-memory decode rate with it and
0.82 with this reader). This reads the shard a megabyte at a time (from any location: a
file, an HTTP or S3 stream, see ``locations``) and takes what a sample needs from each header --
name, size, type -- after checking it as ``tarfile`` does (checksum, numeric fields), so a
damaged shard fails loudly.

It reads what ``tarfile`` reads, member for member, and refuses what ``tarfile`` refuses; where
``tarfile`` guesses (a damaged header after the first taken as the end of the archive, a pax
record it cannot parse skipped, a signed or spaced-out number, a header cut short), this raises
``tarfile.ReadError`` naming the byte offset instead (``tests/faults/test_tar_fuzz.py`` holds
the two to that). A size that would step backwards or stand still (negative, or a pax record of
length 0) is an error, never a loop.

Grouping follows WebDataset: members ``<key>.<ext>`` with the same key in a row form one sample
``{"__key__": key, "__url__": path, ext: bytes, ...}`` (``ext``: everything after the first dot
of the file name, lower-cased); members under a ``__name__`` folder are skipped. POSIX (pax) and GNU long
names are understood; directories, links and other non-file members are skipped.

Headers only: with ``want`` (a test of the member name), a member it turns down is not read but
passed over, and stands in the sample as a ``Span`` (where its bytes lie in the shard). A resumed
run draws the samples it already trained on this way (``loader``), reading only their headers.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

from deepfake_dist.data import locations

BLOCK = 512
_ZEROS = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and the old and contiguous spellings)
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: no data follows (as tarfile reads them)
_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK = (b"x", b"X"), b"g", b"L", b"K"
_EXTENDED = (*_PAX, _PAX_GLOBAL, _LONG_NAME, _LONG_LINK)  # headers that describe the member after them
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,17}) ")  # a length, then a space
_SPACES = b" \t\n\r\v\f"
_HDRCHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")  # searched for anywhere in the header, as tarfile does


class Span(NamedTuple):
    """A member's bytes left unread: ``size`` bytes from byte ``start`` of the shard."""

    start: int
    size: int


class _Chain:
    """What the extended headers before a member say about it. When several set the same thing,
    the first wins, as in ``tarfile`` (whose first header applies its fields last)."""

    def __init__(self, offset: int):
        self.offset, self.name, self.size = offset, None, None


def _number(field: bytes, offset: int) -> int:
    """A header's numeric field: octal digits, optionally between spaces and ended by NUL (what
    follows a NUL is ignored), or GNU base-256 (first byte 0x80, or 0xff for a negative value)."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip(_SPACES)
    if text.strip(b"01234567"):  # a sign, a space inside, any other character
        raise tarfile.ReadError(f"invalid number {field!r} in the header at byte {offset}")
    return int(text, 8) if text else 0


def _byte_sum(block: bytes) -> int:
    """The sum of a header's 512 bytes, from Adler-32's first half (RFC 1950: 1 + the byte sum,
    modulo 65521), which is exact over 256 bytes (at most 65 280) and runs in C where ``sum()``
    steps through the bytes in Python (BENCHMARKS.md, loader)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _number(header[148:156], offset)
    unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header if b > 127)  # some old writers summed signed bytes
    return stored == signed


class _Headers:
    """Checks headers as ``tarfile`` does: the checksum, then every numeric field. Mode, owner,
    time and device numbers rarely differ between a shard's members, so a set of the spans
    already found valid spares parsing them again."""

    def __init__(self):
        self.valid: set[bytes] = set()

    def size_and_kind(self, header: bytes, offset: int) -> tuple[int, bytes]:
        if not _checksum_ok(header, offset):
            raise tarfile.ReadError(f"bad header checksum at byte {offset}")
        span = header[100:124] + header[136:148] + header[329:345]  # mode, uid, gid, mtime, devmajor, devminor
        if span not in self.valid:
            for start, end in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
                _number(header[start:end], offset)
            if len(self.valid) > 1024:
                self.valid.clear()
            self.valid.add(span)
        size = _number(header[124:136], offset)
        if size < 0:
            raise tarfile.ReadError(f"negative member size {size} in the header at byte {offset}")
        kind = header[156:157]
        if kind == b"S":
            raise tarfile.ReadError(f"a sparse file at byte {offset}: not a shard member")
        return size, kind


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_fields(data: bytes, offset: int) -> dict[bytes, bytes]:
    """The records of a pax extended header (``"<length> <key>=<value>\\n"``, up to trailing NULs)."""
    charset = _HDRCHARSET.search(data)
    if charset and not _is_utf8(charset[1]):
        raise tarfile.ReadError(f"a hdrcharset that is not UTF-8 in the extended header at byte {offset}")
    fields, pos = {}, 0
    while pos < len(data) and data[pos]:
        match = _PAX_RECORD.match(data, pos)
        end = pos + int(match[1]) if match else pos
        key, eq, value = (data[match.end():end - 1] if match and end <= len(data) else b"").partition(b"=")
        if not (key and eq and data[end - 1:end] == b"\n"):
            raise tarfile.ReadError(f"bad pax record at byte {pos} of the extended header at byte {offset}")
        if key.startswith(b"GNU.sparse."):
            raise tarfile.ReadError(f"a sparse file in the extended header at byte {offset}: not a shard member")
        fields[key] = value
        pos = end
    return fields


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _apply_pax(chain: _Chain, fields: dict[bytes, bytes], offset: int) -> None:
    if chain.name is None and b"path" in fields:
        chain.name = fields[b"path"].decode("utf-8", "surrogateescape").rstrip("/")
    if chain.size is None and b"size" in fields:
        if not (fields[b"size"].isdigit() and len(fields[b"size"]) <= 20):
            raise tarfile.ReadError(f"invalid pax size {fields[b'size'][:20]!r} in the extended header at byte {offset}")
        chain.size = int(fields[b"size"])


def tar_members(source, chunk: int = 1 << 20,
                want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | Span]]:
    """``(name, data)`` of each regular file in the tar at ``source`` (a location, or a stream
    that ``locations.open_stream`` made, left open), in order, read ``chunk`` bytes at a time;
    ``data`` is a ``Span`` for a member that ``want(name)`` turns down. Raises
    ``tarfile.ReadError`` naming the byte offset for a damaged header or a member cut short; a
    file that simply ends between members (no end-of-archive blocks) ends the iteration, as with
    ``tarfile``."""
    with locations.open_stream(source) if isinstance(source, (str, Path)) else nullcontext(source) as f:
        file_size = f.size
        headers, global_pax, chain = _Headers(), {}, None
        buf, pos, offset = b"", 0, 0  # offset: the file position of buf[pos]
        while True:
            if len(buf) - pos < BLOCK:
                buf, pos = _refill(f, buf, pos, BLOCK, chunk)
            header = buf[pos:pos + BLOCK]
            if len(header) < BLOCK or header == _ZEROS:
                _check_end(header, offset, chain)
                return
            size, kind = headers.size_and_kind(header, offset)
            folder = kind == b"\0" and header[:100].split(b"\0", 1)[0].endswith(b"/")  # the old way to write one
            if kind in _NO_DATA or folder:
                size = 0
            elif chain is not None and chain.size is not None and kind not in _EXTENDED:
                size = chain.size
            step = BLOCK + size + -size % BLOCK
            if size and offset + step > file_size:
                raise tarfile.ReadError(f"unexpected end of data: the member at byte {offset} has {size} bytes, "
                                        f"the file ends at byte {file_size}")
            name = _member_name(header, chain) if kind in _FILE_TYPES and not folder else None
            if name is not None and want is not None and not want(name):
                yield name, Span(offset + BLOCK, size)
            else:
                if len(buf) - pos < step:
                    buf, pos = _refill(f, buf, pos, step, chunk)
                data = buf[pos + BLOCK:pos + BLOCK + size]
                if len(data) < size:
                    raise tarfile.ReadError(f"unexpected end of data in the member at byte {offset}")
                if kind in _EXTENDED:
                    chain = chain or _Chain(offset)
                    _extend(chain, global_pax, kind, buf[pos + BLOCK:pos + step] if kind == _LONG_NAME else data,
                            offset)
                elif name is not None:
                    yield name, data
            if kind not in _EXTENDED:
                chain = None
            pos, offset = pos + step, offset + step


def _check_end(header: bytes, offset: int, chain: _Chain | None) -> None:
    """At a zero block or the end of the file: refuse what ``tarfile`` refuses there."""
    if not header and offset == 0:
        raise tarfile.ReadError("empty file")
    if header and header != _ZEROS:
        raise tarfile.ReadError(f"truncated header at byte {offset}")
    if chain is not None:
        raise tarfile.ReadError(f"the extended header at byte {chain.offset} has no member after it")


def _extend(chain: _Chain, global_pax: dict[bytes, bytes], kind: bytes, data: bytes, offset: int) -> None:
    """Take in an extended header: a pax one (its fields over the global ones), a global pax one
    (for the pax headers after it), a GNU long name (a GNU long link name is not needed)."""
    if kind in _PAX:
        _apply_pax(chain, {**global_pax, **_pax_fields(data, offset)}, offset)
    elif kind == _PAX_GLOBAL:
        global_pax.update(_pax_fields(data, offset))
    elif kind == _LONG_NAME and chain.name is None:
        chain.name = _text(data)  # its blocks up to the first NUL, padding included (as tarfile reads it)


def _member_name(header: bytes, chain: _Chain | None) -> str:
    if chain is not None and chain.name is not None:
        return chain.name
    name = _text(header[:100])
    return f"{_text(header[345:500])}/{name}" if header[345] else name  # a ustar prefix: a long path's folders


def _refill(f, buf: bytes, pos: int, need: int, chunk: int) -> tuple[bytes, int]:
    """The unread part of ``buf`` from ``pos`` (which may lie past its end: bytes to skip) with
    at least ``need`` bytes after it, fewer only at the end of the file."""
    if pos > len(buf):
        f.skip(pos - len(buf))
    rest = buf[pos:]
    return rest + f.read(max(chunk, need - len(rest))), 0


def tar_samples(source, want: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """WebDataset samples of one shard (see the module docstring); ``source`` and ``want``: as
    ``tar_members``."""
    url, sample = str(source) if isinstance(source, (str, Path)) else source.url, None
    for name, data in tar_members(source, want=want):
        base = name.rfind("/") + 1
        dot = name.find(".", base)
        first = name.split("/", 1)[0]
        if dot < 0 or (len(first) >= 4 and first.startswith("__") and first.endswith("__")):
            continue
        key, ext = name[:dot], name[dot + 1 :].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif ext in sample:
            raise ValueError(f"{name}: duplicate file name in the tar")
        sample[ext] = data
    if sample is not None:
        yield sample
