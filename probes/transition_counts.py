"""The transitions the kernel counts for the metrics (ebpf/tcplife.bpf.c struct tlt_counts).

Every transition the program keeps (past the kernel filters) is counted in a per-CPU map as
it happens, by (old state, new state), with the time spent in the old state in the
histogram buckets of tcplife_trace/metrics.py (BUCKETS_S): no event has to reach user space
to be counted, so the counters hold no hole where the ring lost events, and a session that
wants only counts needs no stream of transitions at all. The tracer's own connections (its
start-up check, its metrics endpoint's listener and the scrapes that listener accepts) are
left out: their sockets' ports are listed here before they listen or connect (`own_port`),
and the kernel marks a socket of this process born on a listed port, and a listed listener's
accepted sockets.

    counts = transition_counts.read(program)   # summed over CPUs
    counts.transitions[(1, 4)]                 # ESTABLISHED -> FIN_WAIT1 so far
    counts.hist[1]                             # ESTABLISHED: 13 bucket counts (+Inf last), sum ns
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np

N_STATES = 16
DUR_BOUNDS_NS = (100_000, 1_000_000, 10_000_000, 100_000_000, 500_000_000, 1_000_000_000,
                 5_000_000_000, 10_000_000_000, 30_000_000_000, 60_000_000_000, 300_000_000_000,
                 3_600_000_000_000)  # the C side's dur_bucket(); tests hold it to metrics.BUCKETS_S
DUR_SUM = 15                         # TLT_DUR_SUM: the slot of the sum, ns
SELF_PORTS = 4                       # TLT_SELF_PORTS
# struct tlt_counts as u64 words: trans[256], dur[256], self_births, self_trans
_TRANS, _DUR, _SELF_BIRTHS, _SELF_TRANS = 0, 256, 512, 513
WORDS = 514
SIZE = WORDS * 8


class _Self(ctypes.Structure):  # struct tlt_self
    _fields_ = [("tgid", ctypes.c_uint32), ("ports", ctypes.c_uint16 * SELF_PORTS), ("_pad", ctypes.c_uint16)]


@dataclass
class Counts:
    """Sums over CPUs: transitions[(old, new)], hist[old] = [bucket counts (len(DUR_BOUNDS_NS)
    + 1, the last +Inf)..., sum ns] (Metrics.hist's shape), and the tracer's own left out."""
    transitions: dict[tuple[int, int], int] = field(default_factory=dict)
    hist: dict[int, list[int]] = field(default_factory=dict)
    self_births: int = 0
    self_transitions: int = 0


def check_layout(program) -> None:
    """The compiled map's value is the size this module reads (bcc's own type of it)."""
    leaf = program.bpf[b"tcounts"].sLeaf  # one CPU's
    if ctypes.sizeof(leaf) != SIZE:
        raise RuntimeError(f"struct tlt_counts is {ctypes.sizeof(leaf)} bytes in the program, "
                           f"{SIZE} in probes/transition_counts.py")


def read(program) -> Counts:
    table = program.bpf[b"tcounts"]
    per_cpu = table[table.Key(0)]
    words = np.zeros(WORDS, dtype=np.uint64)
    for leaf in per_cpu:
        words += np.frombuffer(bytes(leaf), dtype=np.uint64, count=WORDS)
    return from_words(words)


def from_words(words: np.ndarray) -> Counts:
    out = Counts(self_births=int(words[_SELF_BIRTHS]), self_transitions=int(words[_SELF_TRANS]))
    trans = words[_TRANS:_TRANS + 256]
    for i in np.flatnonzero(trans).tolist():
        out.transitions[divmod(i, N_STATES)] = int(trans[i])
    dur = words[_DUR:_DUR + 256].reshape(N_STATES, N_STATES)
    nb = len(DUR_BOUNDS_NS) + 1
    for state in np.flatnonzero(dur[:, :nb].sum(axis=1)).tolist():
        out.hist[state] = [int(v) for v in dur[state, :nb]] + [int(dur[state, DUR_SUM])]
    return out


def _edit(program, change) -> None:
    """Read struct tlt_self, change(it), write it back (one entry: the map's key 0)."""
    table = program.bpf[b"self_ends"]
    key = table.Key(0)
    me = _Self.from_buffer_copy(bytes(table[key]))
    change(me)
    table[key] = table.Leaf.from_buffer_copy(bytes(me))


def set_tgid(program, tgid: int) -> None:
    """The tracer's tgid as the kernel sees it, where it differs from os.getpid() (a PID
    namespace of its own): the ports listed are matched with it from now on."""
    _edit(program, lambda me: setattr(me, "tgid", tgid))


def own_port(program, port: int) -> None:
    """List a local port of the tracer's own sockets (before it listens or connects):
    the kernel leaves the connections born of it out of the counts. At most SELF_PORTS; a
    full list is a RuntimeError (a bug: the tracer has two ports of its own at the most)."""
    def add(me):
        me.tgid = me.tgid or os.getpid()  # (set_tgid's, once it was learnt)
        ports = list(me.ports)
        if port in ports:
            return
        if 0 not in ports:
            raise RuntimeError("the tracer's own ports are full (probes/transition_counts.py SELF_PORTS)")
        me.ports[ports.index(0)] = port
    _edit(program, add)


def forget_port(program, port: int) -> None:
    """Take a port off the list (the start-up check's, once its sockets were born: the kernel
    marked them then)."""
    def drop(me):
        for i, p in enumerate(me.ports):
            if p == port:
                me.ports[i] = 0
    _edit(program, drop)
