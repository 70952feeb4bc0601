"""Ways the fault-injection suite damages files: cut short, overwritten, a tar header rewritten
with a valid checksum, replaced by a pickle that runs code when unpickled; and a deadline for
code that must not hang."""

from __future__ import annotations

import io
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file short, as a copy interrupted half way would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def corrupt_image(shard: Path, index: int = 0) -> str:
    """Replace the image bytes of the ``index``-th sample of a shard with garbage (the tar stays
    valid); returns that sample's key."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    images = [info for info, _ in members if info.name.endswith((".png", ".jpg"))]
    key = images[index].name.rsplit(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info is images[index]:
                data = b"\xff\xd8\xff\xe0 this is not a JPEG " * 8
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return key


HEADER_FIELDS = {"size": (124, 136), "type": (156, 157)}


def rewrite_header(shard: Path, index: int, **fields: bytes) -> int:
    """Overwrite fields of the ``index``-th member's header (``size=b"-0000001000"``) and give it
    a valid checksum, as a crafted shard would have; returns the header's byte offset."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[index].offset_data - 512
    data = bytearray(shard.read_bytes())
    for name, value in fields.items():
        start, end = HEADER_FIELDS[name]
        data[offset + start:offset + end] = value.ljust(end - start, b"\0")
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + 512])
    shard.write_bytes(bytes(data))
    return offset


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (SIGALRM: the main thread, POSIX): a read
    that loops forever fails the test instead of hanging it. The alarm repeats every 0.1 s until
    the block is left, in case code running at that moment (a gc callback) swallows the error."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Payload:
    """Unpickling this opens (creates) ``marker`` for writing: a stand-in for any code an
    attacker's pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def armed_pickle(path: Path, marker: Path) -> Path:
    """Write a torch.save file at ``path`` that looks like a state dict but creates ``marker`` when
    unpickled, and prove that it does (then remove the marker): a test that later finds no marker
    shows the loader refused the file, not that the payload was a dud."""
    import torch

    proof = path.with_name(f"{path.name}.pickle")  # torch.load picks its reader by the file name
    torch.save({"weight": torch.zeros(2), "bias": _Payload(marker)}, proof)
    torch.load(proof, weights_only=False)  # the unsafe way, once, on purpose
    assert marker.exists(), "the payload does not run; the test would prove nothing"
    marker.unlink()
    return proof.replace(path)
