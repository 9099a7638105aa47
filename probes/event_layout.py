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


N_KINDS = 10  # TLT_EV_NKINDS


class Flag(enum.IntFlag):
    BIRTH_UNSEEN = 0x01
    NO_ENTRY = 0x02
    NETNS = 0x04
    UID = 0x08
    BYTES = 0x10
    RECV = 0x20
    EOF = 0x40


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
    ]


EVENT_SIZE = ctypes.sizeof(Event)
FIELD_NAMES = [name for name, _ in Event._fields_ if not name.startswith("_")]
# numpy view of the same bytes, for decoding a batch at once
EVENT_DTYPE = np.dtype(Event)
assert EVENT_DTYPE.itemsize == EVENT_SIZE


def field_offsets() -> dict[str, int]:
    return {name: getattr(Event, name).offset for name in FIELD_NAMES}


def layout_cflags() -> list[str]:
    """-D flags the BPF program static-asserts its struct against."""
    flags = [f"-DTLT_EVSZ={EVENT_SIZE}"]
    flags += [f"-DTLT_EVOFF_{name}={off}" for name, off in field_offsets().items()]
    return flags
