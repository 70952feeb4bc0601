"""One exception type for problems with what the user gave us.

A ``UserError`` is printed by the CLI as a single line (no traceback): it must name the file,
key or value at fault and say how to fix it. A write that runs out of space (``disk_full``) is
reported the same way, naming the folder, so a full disk never ends a job with a bare traceback.
"""

import errno
import re
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: a config key, a path, a shard, a checkpoint."""


class GroupFailure(RuntimeError):
    """Another rank of a multi-process run died or stalled; the message names it (see
    ``train.heartbeat``). The CLI prints it as one line and exits with status 1."""


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# how the same failure reads when it comes through safetensors (Rust) or torch.save (C++ zip writer)
_DISK_FULL_TEXT = re.compile(r"No space left|File too large|quota|os error (27|28|122)\b|file write failed|"
                             r"unexpected pos \d+ vs \d+|iostream error", re.IGNORECASE)


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a write refused for lack of space: a
    full disk, a quota, or a file-size limit."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS or _DISK_FULL_TEXT.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(what: str, folder, err: BaseException, after: str) -> UserError:
    """The one line for a write that ran out of space: what failed, the folder, and ``after``
    (what is left intact / what to do)."""
    reason = " ".join(str(err).split())[:160]
    return UserError(f"cannot write {what}: disk full or file too large in {folder} ({reason}); {after}")


RUN_FILES_KEPT = "the checkpoints and any earlier export are intact; free space and rerun to resume"
OUTPUTS_WHOLE = "no file there is half-written; free space and rerun"


@contextmanager
def out_of_space_is_one_line(what: str, folder, after: str = RUN_FILES_KEPT):
    """A write in the block that runs out of space ends in ``disk_full_error``'s line, ``after``
    saying what is kept: by default a run's files whose loss costs no training (its metrics, export,
    summary, sample grids); ``OUTPUTS_WHOLE`` for the files a command derives from its inputs."""
    try:
        yield
    except Exception as err:
        if isinstance(err, UserError) or not disk_full(err):
            raise
        raise disk_full_error(what, folder, err, after) from None
