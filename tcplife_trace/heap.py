"""The C heap of a long trace: large buffers straight from mmap, and back to the kernel when freed.

glibc serves a block above its mmap threshold (128 KiB at first) with a mapping of its own,
unmapped when freed; but each time such a block is freed it raises the threshold to that
block's size (up to 32 MiB), and from then on blocks of that size come from the heap, where
freed memory mostly stays in RSS. A live session allocates and frees such buffers all the
time, in two threads (ring batches of up to 1.3 MB, their columns, the recording's Arrow
batches). Fixing the threshold turns the raising off. Measured at the churn bench's load
(20 s, one round each): with it fixed at 1 MiB the peak RSS of the default view went from 380
to 286 MB, `serve` 327 to 310, `--record` 638 to 581, the CPU per state change unchanged; at
128 KiB `--record` stayed lower still (517 MB) but every batch then came from fresh pages
(about 0.25 us more per state change). The setting is the process's: a notebook that opens a
live session gets it too.
"""
from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD = 1024 * 1024
_done: bool | None = None


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD, once per process; False where the C library
    has no mallopt (or refuses it): nothing changes then."""
    global _done
    if _done is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
        except (OSError, AttributeError):
            _done = False
    return _done
