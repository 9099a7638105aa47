"""Give back the memory of the compiler once the program is loaded.

bcc compiles the BPF program with LLVM and clang, linked into the tracer's process:
about 85 MB of their code is paged in at start and never touched again. Their
read-only, file-backed mappings are asked to be paged out (madvise MADV_PAGEOUT,
Linux 5.4+): clean pages of a file are dropped, and read back from the file should
anything call into them again. Writable mappings (relocated data) are left alone.
"""
from __future__ import annotations

import ctypes

MADV_PAGEOUT = 21
LIBRARIES = ("libLLVM", "libclang")

_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise


def release(maps_path: str = "/proc/self/maps") -> int:
    """Page out the compiler's read-only mappings; returns the bytes advised (0 if the
    kernel does not know MADV_PAGEOUT: then nothing changes, and nothing breaks)."""
    madvise = _madvise()
    advised = 0
    with open(maps_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or not any(lib in parts[5] for lib in LIBRARIES) or "w" in parts[1]:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
                advised += hi - lo
    return advised


