"""How many entries a BPF hash map holds now, without reading them into Python.

BPF_MAP_LOOKUP_BATCH copies a chunk of entries per syscall into one reused buffer; only the
count is kept, so a full 65536-entry connection map costs 16 syscalls and no Python objects
(bcc's items_lookup_batch() builds a ctypes pair for every entry)."""
from __future__ import annotations

import ctypes as ct
import errno


def count_entries(table, chunk: int = 4096) -> int | None:
    """Entries in a bcc hash table now; None when the kernel has no batch lookup (before 5.6)."""
    from bcc.libbcc import lib
    cache = getattr(table, "_tcplife_count_buf", None)
    if cache is None or cache[0] != chunk:
        cache = (chunk, (table.Key * chunk)(), (table.Leaf * chunk)())
        table._tcplife_count_buf = cache
    _, keys, values = cache
    in_batch, out_batch, cnt = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
    total, first = 0, True
    while True:
        cnt.value = chunk
        res = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(in_batch), ct.byref(out_batch),
                                   ct.byref(keys), ct.byref(values), ct.byref(cnt))
        err = ct.get_errno()
        total += cnt.value
        if res != 0:
            if err == errno.ENOENT:  # walked to the end
                return total
            if err == errno.ENOSPC and chunk < (1 << 20):  # one bucket holds more than a chunk
                return count_entries(table, chunk * 4)
            return None
        in_batch.value, first = out_batch.value, False
        if cnt.value == 0:
            return total
