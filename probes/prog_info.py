"""What the kernel counts about each loaded BPF program (struct bpf_prog_info).

The one figure we need is `recursion_misses`: a tracepoint that fires while a
kprobe/tracepoint BPF program already runs on that CPU (the per-CPU
bpf_prog_active guard in trace_call_bpf(), shared by every such program on the
machine, ours and anyone else's) skips every program attached to it and only
bumps this counter. Those hits reach neither our ring nor our statistics map.
"""
from __future__ import annotations

import ctypes
import os

# struct bpf_prog_info is UAPI (append-only): recursion_misses is a u64 at byte 208
# since Linux 5.12; the kernel copies min(our size, its size) and says how much.
INFO_SIZE = 232
RECURSION_MISSES_OFFSET = 208


class ProgInfoError(Exception):
    pass


def _get_info():
    from .bcc_import import import_bcc
    lib = import_bcc().libbcc.lib
    fn = lib.bpf_obj_get_info  # libbcc's wrapper of BPF_OBJ_GET_INFO_BY_FD
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return fn


_fn = None


def recursion_misses(prog_fd: int) -> int | None:
    """The program's recursion_misses; None on a kernel too old to count them."""
    global _fn
    if _fn is None:
        _fn = _get_info()
    buf = ctypes.create_string_buffer(INFO_SIZE)
    size = ctypes.c_uint32(INFO_SIZE)
    if _fn(prog_fd, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise ProgInfoError(f"BPF_OBJ_GET_INFO_BY_FD on fd {prog_fd}: {os.strerror(err) if err else 'failed'}")
    if size.value < RECURSION_MISSES_OFFSET + 8:
        return None
    return int.from_bytes(buf.raw[RECURSION_MISSES_OFFSET:RECURSION_MISSES_OFFSET + 8], "little")
