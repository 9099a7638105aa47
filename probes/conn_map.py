"""The connections the kernel is folding right now (aggregated mode).

In the aggregated mode nothing of a connection reaches user space before it ends, so
its open state is read from the connection map itself: the same fold a LIFE record
carries, as a tuple in the same order (`decode.decode_life_batch`). bcc builds the
map's ctypes types from the C declaration, so field names here cannot drift from it.
"""
from __future__ import annotations

from .decode import AGG_FMT, Ev
from .event_layout import EventKind, Flag


_LIFE, _UNSEEN = int(EventKind.LIFE), int(Flag.BIRTH_UNSEEN)
_KEEP_NO = 2
_NO_COMM = b"\0" * 16


def open_folds(bpf, states: set[int] | None = None) -> list[tuple]:
    """struct tlt_life tuples of every open, kept connection the kernel is folding: ts_ns is
    when it entered its current state, old and new state both that state (the Lifecycle takes
    its times from the fold itself). One opened before the trace that has only read or
    written since (no state change: state 0) is there too, as the Tracker has it from its
    reads (Tracker._io), unless `states` asks for some states only."""
    table = bpf[b"conns"]
    try:
        items = list(table.items_lookup_batch())  # one syscall per batch (kernel 5.6+)
    except Exception:  # noqa: BLE001 - bcc raises Exception; older kernels: walk the keys
        items = list(table.items())
    out = []
    for k, v in items:
        # (a listener is folded too, for its events' owner and times, but its lifecycle is
        # made of events: streamed)
        if v.closed or v.streamed or v.keep == _KEEP_NO or (states is not None and v.state not in states):
            continue
        if not v.state and not v.agg.start_ns:  # (an entry made for another reason, nothing folded)
            continue
        flags = v.flags | (_UNSEEN if v.unseen else 0)
        skaddr = k if isinstance(k, int) else k.value
        ev = Ev(ts_ns=v.agg.enter_ns, skaddr=skaddr, gen=v.gen, tx_b=0, rx_b=0, netns_raw=v.netns, pid=0, tid=0,
                uid_raw=v.uid, value=0, sport=v.sport, dport=v.dport, af=v.af, kind=_LIFE, oldstate=v.state,
                newstate=v.state, flags=flags, saddr_raw=bytes(v.saddr), daddr_raw=bytes(v.daddr),
                comm_raw=_NO_COMM, seq=0)
        out.append(tuple(ev) + AGG_FMT.unpack(bytes(v.agg)))
    return out
