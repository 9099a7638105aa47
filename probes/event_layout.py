"""The Python half of the kernel boundary: ebpf/event.h declared once for Python.

`Event` mirrors `struct tlt_event`. The BPF program is compiled with the sizes
and offsets computed here and static-asserts them (`layout_cflags`), and a test
compiles event.h with gcc and compares, so the halves cannot drift silently.
"""
from __future__ import annotations

import ctypes
import enum

import numpy as np


class EventKind(enum.IntEnum):
    STATE = 1
    DESTROY = 2
    RECV_RESET = 3
    SEND_RESET = 4
    ERROR = 5
    IO_OWNER = 6
    EOF = 7
    FILTERED = 8
    SYNACK = 9
    LIFE = 10


N_KINDS = 11  # TLT_EV_NKINDS


class Flag(enum.IntFlag):
    BIRTH_UNSEEN = 0x01
    NO_ENTRY = 0x02
    NETNS = 0x04
    UID = 0x08
    BYTES = 0x10
    RECV = 0x20
    EOF = 0x40
    AGG = 0x80


class LifeFlag(enum.IntFlag):
    """struct tlt_agg.lflags"""
    RST_RECEIVED = 0x01
    RST_SENT = 0x02
    DESTROYED = 0x04
    REUSED = 0x08
    LISTENER = 0x10
    RETRANS = 0x20   # retrans/syn_retrans counted (tcp:tcp_retransmit_skb traced)
    CONG = 0x40      # recoveries/losses counted (tcp:tcp_cong_state_set traced)


class XFlag(enum.IntFlag):
    """struct tlt_event.xflags: what the kernel's fold adds to an event"""
    FOLDED = 0x01     # the connection has a map entry: dur_ns, owner_*, role are the kernel's
    DUR = 0x02        # dur_ns valid: time spent in oldstate
    TIME_WAIT = 0x04  # a CLOSE from FIN_WAIT2/CLOSING with no reset received (Transition.note)
    LISTENER = 0x08   # passive: the listener's owner was found at SYN_RECV


# struct tlt_event.role (TLT_ROLE_*): index -> Lifecycle.role; struct tlt_event.owner_src /
# tlt_agg.owner_src (TLT_SRC_*): index -> Lifecycle.owner_source, strongest first. Their one
# home is analysis/rules.py (tests/test_rules.py holds ebpf/event.h equal to it)
from tcplife_trace.analysis.rules import KERNEL_ROLES as ROLE_NAMES  # noqa: E402
from tcplife_trace.analysis.rules import OWNER_SOURCES as OWNER_SOURCE_NAMES  # noqa: E402
from tcplife_trace.analysis.rules import SRC_NONE  # noqa: E402,F401


PATH_MAX = 32  # TLT_PATH_MAX
HEALTH_N = 18  # TLT_HEALTH_N: struct tlt_agg.health[], in probes/btf.py TCP_SOCK_HEALTH's order
PIDS_MAX = 4   # TLT_PIDS_MAX


# per-CPU statistics slots (TLT_STAT_*)
STAT_EMITTED = 0
STAT_DROPPED = N_KINDS
STAT_MAP_FULL = 2 * N_KINDS
STAT_SPILLED = 2 * N_KINDS + 1
STAT_NSLOTS = 3 * N_KINDS + 1


class Event(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("skaddr", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
        ("tx_b", ctypes.c_uint64),
        ("rx_b", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("value", ctypes.c_int32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("kind", ctypes.c_uint8),
        ("oldstate", ctypes.c_uint8),
        ("newstate", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
        ("seq", ctypes.c_uint16),
        # appended after seq: the connection's fold after this event (xflags & FOLDED)
        ("dur_ns", ctypes.c_uint64),
        ("owner_pid", ctypes.c_uint32),
        ("owner_comm", ctypes.c_char * 16),
        ("owner_src", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("xflags", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
        # appended (issue 15): the fold's owner's cgroup v2 id after this event (0: none yet)
        ("cgroup_id", ctypes.c_uint64),
    ]


class Agg(ctypes.Structure):
    """struct tlt_agg: one connection folded in the kernel."""
    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("eof_ns", ctypes.c_uint64),
        ("enter_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
        ("state_ns", ctypes.c_uint64 * 16),
        ("owner_pid", ctypes.c_uint32),
        ("pids", ctypes.c_uint32 * PIDS_MAX),
        ("rst_reason", ctypes.c_int32),
        ("owner_comm", ctypes.c_char * 16),
        ("state_mask", ctypes.c_uint16),
        ("owner_src", ctypes.c_uint8),
        ("npids", ctypes.c_uint8),
        ("path_len", ctypes.c_uint8),
        ("rst_state", ctypes.c_uint8),
        ("lflags", ctypes.c_uint8),
        ("gaps", ctypes.c_uint8),
        ("gap_had", ctypes.c_uint8),
        ("gap_got", ctypes.c_uint8),
        ("path", ctypes.c_uint8 * PATH_MAX),
        ("listener_pid", ctypes.c_uint32),
        ("listener_comm", ctypes.c_char * 16),
        # appended (issue 15)
        ("cgroup_id", ctypes.c_uint64),
        ("retrans", ctypes.c_uint32),
        ("syn_retrans", ctypes.c_uint16),
        ("recoveries", ctypes.c_uint16),
        ("losses", ctypes.c_uint16),
        ("_hpad", ctypes.c_uint16),
        ("health_mask", ctypes.c_uint32),
        ("health", ctypes.c_uint64 * HEALTH_N),
    ]


class Life(ctypes.Structure):
    """struct tlt_life: a LIFE record (the lives ring buffer)."""
    _fields_ = [("ev", Event), ("agg", Agg)]


EVENT_SIZE = ctypes.sizeof(Event)
AGG_SIZE = ctypes.sizeof(Agg)
LIFE_SIZE = ctypes.sizeof(Life)
AGG_FIELD_NAMES = [name for name, _ in Agg._fields_ if not name.startswith("_")]
FIELD_NAMES = [name for name, _ in Event._fields_ if not name.startswith("_")]
V1_FIELD_NAMES = FIELD_NAMES[:21]  # struct tlt_event up to seq: recordings of schema 1
V3_FIELD_NAMES = FIELD_NAMES[:FIELD_NAMES.index("cgroup_id")]  # up to xflags: recordings of schema 2 and 3
# numpy view of the same bytes, for decoding a batch at once


def _dtype(struct: type) -> np.dtype:
    """numpy's view of a ctypes struct, field for field at the same offsets; a char array is
    one bytes value ("S16": comm, owner_comm), a byte array a (16,) uint8 column (addresses)."""
    names, formats, offsets = [], [], []
    for name, ctype in struct._fields_:
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            fmt = _dtype(ctype)
        elif getattr(ctype, "_type_", None) is ctypes.c_char:
            fmt = np.dtype(f"S{ctype._length_}")
        else:
            fmt = np.dtype(ctype)
        names.append(name)
        formats.append(fmt)
        offsets.append(getattr(struct, name).offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": ctypes.sizeof(struct)})


EVENT_DTYPE = _dtype(Event)
assert EVENT_DTYPE.itemsize == EVENT_SIZE
# struct tlt_life as numpy: fields "ev" (EVENT_DTYPE) and "agg" (struct tlt_agg)
AGG_DTYPE = _dtype(Agg)
LIFE_DTYPE = _dtype(Life)
assert LIFE_DTYPE.itemsize == LIFE_SIZE and LIFE_DTYPE["ev"] == EVENT_DTYPE


def _code(ctype) -> str:
    """The `struct` code of a ctypes integer at its standard size ("<": c_uint64's native "L"
    would be 4 bytes there)."""
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[ctypes.sizeof(ctype)]
    return code.lower() if ctype._type_.islower() else code


def unpack_format(struct: type, fields=None, whole: tuple[str, ...] = ()) -> tuple[str, list[tuple[str, int]]]:
    """The `struct` module's format of a ctypes struct ("<", every byte covered: padding and
    the fields not in `fields` as "x"), and each field's slots in an unpacked tuple: a char or
    byte array is one bytes value, any other array one slot per element unless its name is in
    `whole` (then one bytes value too)."""
    fmt, slots, at = "<", [], 0
    for name, ctype in struct._fields_:
        off = getattr(struct, name).offset
        if name.startswith("_") or (fields is not None and name not in fields):
            continue
        if off > at:
            fmt += f"{off - at}x"
        size = ctypes.sizeof(ctype)
        elem = getattr(ctype, "_type_", None)
        if hasattr(ctype, "_length_") and (elem in (ctypes.c_char, ctypes.c_uint8) or name in whole):
            fmt, n = fmt + f"{size}s", 1
        elif hasattr(ctype, "_length_"):
            fmt, n = fmt + f"{ctype._length_}{_code(elem)}", ctype._length_
        else:
            fmt, n = fmt + _code(ctype), 1
        slots.append((name, n))
        at = off + size
    if ctypes.sizeof(struct) > at:
        fmt += f"{ctypes.sizeof(struct) - at}x"
    return fmt, slots


def _arrow_types() -> dict:
    """Arrow type of each event column (FIELD_NAMES order): integers as they are, addresses
    and command names as fixed-size binary (the bytes of each numpy column are its values)."""
    import pyarrow as pa
    out = {}
    for name in FIELD_NAMES:
        base, shape = EVENT_DTYPE[name].base, EVENT_DTYPE[name].shape
        if shape or base.kind == "S":
            out[name] = pa.binary(EVENT_DTYPE[name].itemsize)
        else:
            out[name] = pa.from_numpy_dtype(base)
    return out


def __getattr__(name: str):
    # ARROW_TYPES on first use: pyarrow is imported by the code that records or loads only
    if name == "ARROW_TYPES":
        types = _arrow_types()
        globals()["ARROW_TYPES"] = types
        return types
    raise AttributeError(name)


def field_offsets() -> dict[str, int]:
    return {name: getattr(Event, name).offset for name in FIELD_NAMES}


def agg_field_offsets() -> dict[str, int]:
    return {name: getattr(Agg, name).offset for name in AGG_FIELD_NAMES}


def layout_cflags() -> list[str]:
    """-D flags the BPF program static-asserts its structs against."""
    flags = [f"-DTLT_EVSZ={EVENT_SIZE}", f"-DTLT_AGGSZ={AGG_SIZE}"]
    flags += [f"-DTLT_EVOFF_{name}={off}" for name, off in field_offsets().items()]
    flags += [f"-DTLT_AGGOFF_{name}={off}" for name, off in agg_field_offsets().items()]
    return flags
