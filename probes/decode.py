"""Raw ring-buffer bytes -> `Ev` records with Python values."""
from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from .event_layout import EVENT_SIZE, Event, Flag

# struct tlt_event, in order (checked against ctypes below)
_FMT = struct.Struct("<QQQQQIIIIiHHHBBBB16s16s16s2x")
assert _FMT.size == EVENT_SIZE and Event.comm.offset == EVENT_SIZE - 18

_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_ZERO16 = b"\0" * 16


class Ev(NamedTuple):
    ts_ns: int          # CLOCK_MONOTONIC, ns
    kind: int           # EventKind
    skaddr: int
    gen: int            # connection generation; 0 when the kernel had none
    netns: int | None
    pid: int            # current task (tgid): the owner only in process-context transitions
    tid: int
    comm: str
    uid: int | None
    value: int
    family: int | None  # 4 or 6 (v4-mapped IPv6 is 4); None when the event has no tuple
    saddr: str | None   # local address
    daddr: str | None   # remote address
    sport: int          # local port, 0 = not known yet
    dport: int          # remote port, 0 = none
    oldstate: int
    newstate: int
    flags: int
    tx_b: int | None
    rx_b: int | None


_addr_cache: dict[tuple[int, bytes], str] = {}


def _addr(family: int, raw: bytes) -> str:
    key = (family, raw)
    s = _addr_cache.get(key)
    if s is None:
        if family == socket.AF_INET:
            s = socket.inet_ntop(socket.AF_INET, raw[:4])
        elif raw[:12] == _V4MAPPED:
            s = socket.inet_ntop(socket.AF_INET, raw[12:])
        else:
            s = socket.inet_ntop(socket.AF_INET6, raw)
        if len(_addr_cache) > 65536:
            _addr_cache.clear()
        _addr_cache[key] = s
    return s


def decode(raw: bytes) -> Ev:
    (ts, skaddr, gen, tx, rx, netns, pid, tid, uid, value, sport, dport, fam, kind,
     old, new, flags, saddr, daddr, comm) = _FMT.unpack_from(raw)
    if fam == socket.AF_INET or fam == socket.AF_INET6:
        family = 6 if fam == socket.AF_INET6 and not (daddr[:12] == _V4MAPPED or (
            daddr == _ZERO16 and saddr[:12] == _V4MAPPED)) else 4
        sa, da = _addr(fam, saddr), _addr(fam, daddr)
    else:
        family = sa = da = None
    return Ev(ts, kind, skaddr, gen, netns if flags & Flag.NETNS else None, pid, tid,
              comm.split(b"\0", 1)[0].decode(errors="replace"), uid if flags & Flag.UID else None,
              value, family, sa, da, sport, dport, old, new, flags,
              tx if flags & Flag.BYTES else None, rx if flags & Flag.BYTES else None)


def decode_many(chunks: list[bytes]) -> list[Ev]:
    return [decode(c) for c in chunks]
