"""The connections the kernel is folding right now (aggregated mode).

In the aggregated mode nothing of a connection reaches user space before it ends, so
its open state is read from the connection map itself: the same fold a LIFE record
carries, as a tuple in the same order (`decode.decode_life_batch`). bcc builds the
map's ctypes types from the C declaration, so field names here cannot drift from it.
"""
from __future__ import annotations

import ctypes as ct
import errno

import numpy as np

from .decode import life_tuples
from .event_layout import LIFE_DTYPE, EventKind, Flag


_LIFE, _UNSEEN = int(EventKind.LIFE), int(Flag.BIRTH_UNSEEN)
_KEEP_NO = 2


def _lookup_all(table) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, values as numpy records of bcc's Leaf) of every entry: BPF_MAP_LOOKUP_BATCH
    into two buffers of the map's size made once per table and reused by every look (bcc's
    items_lookup_batch makes them anew each call: 34 MB of ctypes arrays at the default
    --max-conns, fresh pages every look), the open ones then picked as columns. None: no
    batch lookup here (or it failed): walk the keys."""
    from bcc import lib  # (probes/bcc_import made sure it imports)
    bufs = getattr(table, "_tlt_batch_buffers", None)
    if bufs is None:
        n = table.max_entries
        bufs = ((table.Key * n)(), (table.Leaf * n)(), np.dtype(table.Leaf))
        table._tlt_batch_buffers = bufs
    keys, values, dtype = bufs
    size, ksz, vsz = len(keys), ct.sizeof(table.Key), ct.sizeof(table.Leaf)
    token, count, total = ct.c_uint32(0), ct.c_uint32(0), 0
    while total < size:
        count.value = size - total
        res = lib.bpf_lookup_batch(table.map_fd, ct.byref(token) if total else None, ct.byref(token),
                                   ct.byref(keys, ksz * total), ct.byref(values, vsz * total), ct.byref(count))
        err = ct.get_errno()
        total += count.value
        if res != 0:
            if err == errno.ENOENT:  # the walk is over
                break
            return None  # (no batch lookup here, or it failed: the caller walks the keys, as before)
    k = np.frombuffer(keys, dtype=np.uint64, count=total)
    v = np.frombuffer(values, dtype=dtype, count=total)
    return k.copy(), v.copy()


def open_folds(bpf, states: set[int] | None = None) -> list[tuple]:
    """struct tlt_life tuples of every open, kept connection the kernel is folding: ts_ns is
    when it entered its current state, old and new state both that state (the Lifecycle takes
    its times from the fold itself). One opened before the trace that has only read or
    written since (no state change: state 0) is there too, as the Tracker has it from its
    reads (Tracker._io), unless `states` asks for some states only."""
    table = bpf[b"conns"]
    found = _lookup_all(table)
    if found is None:  # older kernels: walk the keys
        items = list(table.items())
        found = (np.array([k if isinstance(k, int) else k.value for k, _ in items], dtype=np.uint64),
                 np.array([bytes(v) for _, v in items], dtype=f"V{ct.sizeof(table.Leaf)}").view(np.dtype(table.Leaf))
                 if items else np.zeros(0, dtype=np.dtype(table.Leaf)))
    keys, v = found
    agg = v["agg"]
    # (a listener is folded too, for its events' owner and times, but its lifecycle is made
    # of events: streamed; an entry made for another reason has nothing folded)
    kept = (v["closed"] == 0) & (v["streamed"] == 0) & (v["keep"] != _KEEP_NO) & \
        ((v["state"] != 0) | (agg["start_ns"] != 0))
    if states is not None:
        kept &= np.isin(v["state"], sorted(states))
    v, keys = v[kept], keys[kept]
    out = np.zeros(len(v), dtype=LIFE_DTYPE)
    ev = out["ev"]
    ev["ts_ns"] = v["agg"]["enter_ns"]
    ev["skaddr"], ev["gen"] = keys, v["gen"]
    ev["netns"], ev["uid"] = v["netns"], v["uid"]
    ev["sport"], ev["dport"], ev["family"] = v["sport"], v["dport"], v["af"]
    ev["kind"], ev["oldstate"], ev["newstate"] = _LIFE, v["state"], v["state"]
    ev["flags"] = v["flags"] | np.where(v["unseen"] != 0, _UNSEEN, 0).astype(np.uint8)
    ev["saddr"], ev["daddr"] = v["saddr"], v["daddr"]
    out["agg"] = np.frombuffer(np.ascontiguousarray(v["agg"]).tobytes(), dtype=LIFE_DTYPE["agg"])  # (bcc's field names)
    return life_tuples(out)
