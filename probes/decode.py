"""Raw ring-buffer bytes -> `Ev` records.

Decoding is one struct unpack per event; addresses, command names and the
optional fields stay raw until someone asks (`addr`, `comm`, `endpoint_family`,
`netns`, ...), because most events of a connection repeat what its first said.
"""
from __future__ import annotations

import socket
import struct
from typing import NamedTuple

import numpy as np

from .event_layout import (AGG_SIZE, EVENT_DTYPE, EVENT_SIZE, LIFE_DTYPE, LIFE_SIZE, SRC_NONE, V1_FIELD_NAMES, Agg,
                           Event, EventKind, Flag, Life, unpack_format)

# `Ev`'s fields: struct tlt_event's first 21 (up to seq), then its last (cgroup_id: the
# connection's home, which the Tracker keeps); the fold's other fields appended after seq
# (dur_ns, owner_*, role, xflags: see event_layout) are skipped here, read as numpy columns.
# The format is derived from event_layout's Event, the one declaration of the bytes.
_EV_FIELDS = V1_FIELD_NAMES + ["cgroup_id"]
_FMT = struct.Struct(unpack_format(Event, _EV_FIELDS)[0])
assert _FMT.size == EVENT_SIZE

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_ZERO16 = b"\0" * 16
F_NETNS, F_UID, F_BYTES, F_EOF = int(Flag.NETNS), int(Flag.UID), int(Flag.BYTES), int(Flag.EOF)


class Ev(NamedTuple):
    """struct tlt_event, field for field (see ebpf/event.h)."""
    ts_ns: int          # CLOCK_MONOTONIC, ns
    skaddr: int
    gen: int            # connection generation; 0 when the kernel had none
    tx_b: int           # valid if flags & BYTES
    rx_b: int
    netns_raw: int      # valid if flags & NETNS
    pid: int            # current task (tgid): the owner only in process-context transitions
    tid: int
    uid_raw: int        # valid if flags & UID
    value: int
    sport: int          # local port, 0 = not known yet
    dport: int          # remote port, 0 = none
    af: int             # AF_INET, AF_INET6, or 0 when the event carries no tuple
    kind: int           # EventKind
    oldstate: int
    newstate: int
    flags: int
    saddr_raw: bytes    # local address (IPv4 in the first 4 bytes)
    daddr_raw: bytes
    comm_raw: bytes
    seq: int            # per-connection event counter (wraps at 65536)
    cgroup_id: int = 0  # the fold's owner's cgroup v2 id after this event; 0: none (yet), or no fold


_addr_cache: dict[tuple[int, bytes], str] = {}
_comm_cache: dict[bytes, str] = {}


def addr(af: int, raw: bytes) -> str:
    """Printable address; v4-mapped IPv6 is shown as IPv4."""
    key = (af, raw)
    s = _addr_cache.get(key)
    if s is None:
        if af == AF_INET:
            s = socket.inet_ntop(AF_INET, raw[:4])
        elif raw[:12] == _V4MAPPED:
            s = socket.inet_ntop(AF_INET, raw[12:])
        else:
            s = socket.inet_ntop(AF_INET6, raw)
        if len(_addr_cache) > 65536:
            _addr_cache.clear()
        _addr_cache[key] = s
    return s


def comm(raw: bytes) -> str:
    s = _comm_cache.get(raw)
    if s is None:
        nul = raw.find(b"\0")
        s = (raw if nul < 0 else raw[:nul]).decode(errors="replace")
        if len(_comm_cache) > 65536:
            _comm_cache.clear()
        _comm_cache[raw] = s
    return s


def endpoint_family(ev: Ev) -> int | None:
    """4 or 6 for an event that carries a tuple (v4-mapped IPv6 counts as 4), else None."""
    if ev.af == AF_INET:
        return 4
    if ev.af != AF_INET6:
        return None
    d = ev.daddr_raw
    if d[:12] == _V4MAPPED or (d == _ZERO16 and ev.saddr_raw[:12] == _V4MAPPED):
        return 4
    return 6


def endpoint_families(af: np.ndarray, saddr: np.ndarray, daddr: np.ndarray) -> np.ndarray:
    """endpoint_family per row of columns (the family column, (n, 16) uint8 addresses):
    4 (v4-mapped IPv6 too), 6, else 0."""
    mapped_d = (daddr[:, :10] == 0).all(1) & (daddr[:, 10] == 255) & (daddr[:, 11] == 255)
    mapped_s = (saddr[:, :10] == 0).all(1) & (saddr[:, 10] == 255) & (saddr[:, 11] == 255)
    zero_d = (daddr == 0).all(1)
    v6 = np.where(mapped_d | (zero_d & mapped_s), 4, 6)
    return np.where(af == AF_INET, 4, np.where(af == AF_INET6, v6, 0))


def netns(ev: Ev) -> int | None:
    return ev.netns_raw if ev.flags & F_NETNS else None


def uid(ev: Ev) -> int | None:
    return ev.uid_raw if ev.flags & F_UID else None


def byte_counts(ev: Ev) -> tuple[int | None, int | None]:
    return (ev.tx_b, ev.rx_b) if ev.flags & F_BYTES else (None, None)


N_EV_FIELDS = len(Ev._fields)
assert N_EV_FIELDS == len(_EV_FIELDS)
_N_V1 = len(V1_FIELD_NAMES)
_make = Ev._make
_unpack = _FMT.unpack_from
_iter_unpack = _FMT.iter_unpack


def decode(raw: bytes) -> Ev:
    return _make(_unpack(raw))


def decode_batch(blob: bytes) -> list[tuple]:
    """Concatenated events (each exactly EVENT_SIZE bytes) in one pass, as plain tuples in
    `Ev` field order: the hot path unpacks them; `as_ev` names them where speed does not matter."""
    return list(_iter_unpack(blob))


def event_tuples(events: np.ndarray) -> list[tuple]:
    """An EVENT_DTYPE array as `Ev`-ordered tuples (what decode_batch gives for its bytes)."""
    return list(_iter_unpack(events.tobytes())) if len(events) else []


def events_array(tuples) -> np.ndarray:
    """`Ev`-ordered tuples as an EVENT_DTYPE array, with no fold (as the kernel sends an event
    without one: xflags 0, owner_src SRC_NONE, the rest past seq zero) but the cgroup id they
    carry (a tuple of the first 21 fields only: 0)."""
    pack = _FMT.pack
    n, v1 = N_EV_FIELDS, _N_V1
    out = np.frombuffer(bytearray(b"".join([pack(*t) if len(t) == n else pack(*t[:v1], 0) for t in tuples])),
                        dtype=EVENT_DTYPE)
    out["owner_src"] = SRC_NONE
    return out


def as_ev(ev: tuple) -> Ev:
    return ev if type(ev) is Ev else _make(ev) if len(ev) == N_EV_FIELDS else Ev(*ev[:_N_V1])


# struct tlt_life: the event (as `Ev`), then struct tlt_agg, field for field (event_layout's
# Agg); arrays one slot per element (state_ns[16], pids[4]) but health[], which stays one bytes
# value: most records are never asked for it, and a tuple of 18 ints per record is the
# decode's cost; health.from_fold unpacks it
_AGG_FORMAT, _AGG_SLOTS = unpack_format(Agg, whole=("health",))
AGG_FMT = struct.Struct(_AGG_FORMAT)
_LIFE_FMT = struct.Struct(_FMT.format + AGG_FMT.format[1:])
assert _LIFE_FMT.size == LIFE_SIZE and Life.agg.offset == EVENT_SIZE and AGG_FMT.size == AGG_SIZE
# position of each struct tlt_agg field in a decoded LIFE tuple (arrays take one slot per element)
LIFE_INDEX: dict[str, int] = {}
_at = N_EV_FIELDS
for _name, _n in _AGG_SLOTS:
    LIFE_INDEX[_name], _at = _at, _at + _n
assert N_EV_FIELDS + sum(n for _, n in _AGG_SLOTS) == len(_LIFE_FMT.unpack(bytes(LIFE_SIZE)))
_KIND_LIFE, _I_KIND = int(EventKind.LIFE), _EV_FIELDS.index("kind")
_life_iter_unpack = _LIFE_FMT.iter_unpack


def decode_life_batch(blob: bytes) -> list[tuple]:
    """Records of LIFE_SIZE bytes: a LIFE record is the event's
    fields followed by struct tlt_agg's; any other kind is cut to the event's fields."""
    return [t if t[_I_KIND] == _KIND_LIFE else t[:N_EV_FIELDS] for t in _life_iter_unpack(blob)]


def life_tuples(lives: np.ndarray) -> list[tuple]:
    """A LIFE_DTYPE array as LIFE tuples (decode_life_batch's form)."""
    if lives.dtype != LIFE_DTYPE:  # (a packed copy: numpy's promotion drops the padding)
        lives = lives.astype(LIFE_DTYPE)
    return list(_life_iter_unpack(lives.tobytes())) if len(lives) else []


def lives_array(recs: list[tuple]) -> np.ndarray:
    """LIFE tuples (life_tuples' form) back into a LIFE_DTYPE array, byte for byte."""
    return np.frombuffer(bytearray(b"".join(_LIFE_FMT.pack(*r) for r in recs)), dtype=LIFE_DTYPE)


def decode_many(chunks: list[bytes]) -> list[Ev]:
    return list(map(_make, _iter_unpack(b"".join(chunks))))
