"""The connections the kernel is folding right now (aggregated mode).

In the aggregated mode nothing of a connection reaches user space before it ends, so
its open state is read from the connection map itself: the same fold a LIFE record
carries, as a tuple in the same order (`decode.decode_life_batch`). bcc builds the
map's ctypes types from the C declaration, so field names here cannot drift from it.
"""
from __future__ import annotations

from .decode import AGG_FMT, Ev
from .event_layout import EventKind, Flag

_EV_ORDER = ("ts_ns", "skaddr", "gen", "tx_b", "rx_b", "netns_raw", "pid", "tid", "uid_raw", "value", "sport",
             "dport", "af", "kind", "oldstate", "newstate", "flags", "saddr_raw", "daddr_raw", "comm_raw", "seq")
assert _EV_ORDER == Ev._fields  # the tuple below is built in this order

_LIFE, _UNSEEN = int(EventKind.LIFE), int(Flag.BIRTH_UNSEEN)
_KEEP_NO = 2
_NO_COMM = b"\0" * 16


def open_folds(bpf, states: set[int] | None = None) -> list[tuple]:
    """struct tlt_life tuples of every open, kept connection with at least one transition
    folded: ts_ns is when it entered its current state, old and new state both that state
    (the Lifecycle takes its times from the fold itself). `states`: only those states."""
    table = bpf[b"conns"]
    try:
        items = list(table.items_lookup_batch())  # one syscall per batch (kernel 5.6+)
    except Exception:  # noqa: BLE001 - bcc raises Exception; older kernels: walk the keys
        items = list(table.items())
    out = []
    for k, v in items:
        if v.closed or not v.state or v.keep == _KEEP_NO or (states is not None and v.state not in states):
            continue
        flags = v.flags | (_UNSEEN if v.unseen else 0)
        skaddr = k if isinstance(k, int) else k.value
        ev = (v.agg.enter_ns, skaddr, v.gen, 0, 0, v.netns, 0, 0, v.uid, 0, v.sport, v.dport, v.af, _LIFE,
              v.state, v.state, flags, bytes(v.saddr), bytes(v.daddr), _NO_COMM, 0)
        out.append(ev + AGG_FMT.unpack(bytes(v.agg)))
    return out
