"""Files the tracer writes that hold addresses and process names (recordings, reports):
mode 0600, never through a symlink, never into a file someone planted.

Recordings are created exclusively (never overwritten). A report may replace an earlier
one: it is written to a new file of its own beside the target and renamed over it, so a
symlink or another user's file at the name is replaced, never written through.
"""
from __future__ import annotations

import os
import secrets
import stat

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create(path: str) -> int:
    """A new file, 0600, exclusively (FileExistsError if anything, a symlink included, is there)."""
    return os.open(path, FLAGS, 0o600)


def check_replaceable(path: str) -> None:
    """OSError (with strerror) now if replace(path) would fail for want of a directory or the
    right to write into it; creates nothing."""
    d = os.path.dirname(os.path.abspath(path))
    if not stat.S_ISDIR(os.stat(d).st_mode):  # (os.stat says why: ENOENT, EACCES, ENOTDIR)
        raise NotADirectoryError(20, f"{d} is not a directory", d)
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(21, "is a directory", path)
    if not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(13, f"cannot create files in {d}", d)


def replace(path: str, data: bytes) -> None:
    """Write data to a new 0600 file beside path, fsync it, rename it over path."""
    d, base = os.path.split(os.path.abspath(path))
    for _ in range(8):  # a name taken (planted) is skipped, never opened
        tmp = os.path.join(d, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = create(tmp)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(17, "no free temporary name", d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
