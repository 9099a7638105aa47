"""Do the BTF offsets compiled into the program read what they should? Checked at start on
the tracer's own loopback connection, whose answers the process knows: the netns inode
(/proc/self/ns/net), the socket's uid (our euid) and the bytes it sent and received.

Offsets come from the kernel's BTF, cached in /run (probes/btf.py); a cache that was
tampered with, or stale in a way its key does not catch, would otherwise give wrong netns,
uids and byte counts with no sign of it.
"""
from __future__ import annotations

import os
import socket
import time

from . import transition_counts
from .event_layout import EventKind

PAYLOAD = 1500            # bytes the client sends, the server reads and echoes
WAIT_S = 1.0              # for the events of our own connection to come back
_STATE, _LIFE = int(EventKind.STATE), int(EventKind.LIFE)
# Ev fields: 2 gen, 3 tx_b, 4 rx_b, 5 netns, 8 uid, 10 sport, 11 dport, 13 kind, 15 newstate
_GEN, _TX, _RX, _NETNS, _UID, _SPORT, _DPORT, _KIND, _NEW = 2, 3, 4, 5, 8, 10, 11, 13, 15
_CLOSE = 7


def possible(filters) -> bool:
    """Whether a kernel filter would hide our own connection (-p, -L, -D, --cgroup and
    --container do; -4/-6 do not: the connection takes the family traced)."""
    return not (filters.pids or filters.lports or filters.rports or filters.cgroups)


def _connection(family: int, program=None) -> tuple[set[int], int]:
    """A loopback connection of our own, ended: (its two ports, bytes each way). Both ports
    are bound first and listed to the kernel as the tracer's own (probes/transition_counts.py)
    before the listener listens and the client connects, so its transitions are not counted."""
    af, host = (socket.AF_INET6, "::1") if family == 6 else (socket.AF_INET, "127.0.0.1")
    with socket.socket(af, socket.SOCK_STREAM) as ls, socket.socket(af, socket.SOCK_STREAM) as c:
        ls.bind((host, 0))
        c.bind((host, 0))
        port, cport = ls.getsockname()[1], c.getsockname()[1]
        if program is not None:
            transition_counts.own_port(program, port)
            transition_counts.own_port(program, cport)
        try:
            ls.listen(1)
            c.settimeout(2)
            c.connect((host, port))
            a, _ = ls.accept()
        finally:  # the kernel marked both sockets at their birth: the list is free again
            if program is not None:
                transition_counts.forget_port(program, port)
                transition_counts.forget_port(program, cport)
        with a:
            a.settimeout(2)
            c.sendall(b"x" * PAYLOAD)
            got = 0
            while got < PAYLOAD:
                got += len(a.recv(PAYLOAD - got) or b"")
            a.sendall(b"y" * PAYLOAD)
            got = 0
            while got < PAYLOAD:
                got += len(c.recv(PAYLOAD - got) or b"")
    return {port, cport}, PAYLOAD


def is_own(ev, ports: set[int], gens: frozenset[int] | set[int] = frozenset()) -> bool:
    """An event of the check's connection or listener: by its generation once those are known
    (reads and writes carry no ports; another listener may reuse a port of ours), else by its
    ports (a SYN_SENT socket has no local port yet, a listener no remote one)."""
    if gens and ev[_GEN]:
        return ev[_GEN] in gens
    return {ev[_SPORT], ev[_DPORT]} <= ports | {0} and (ev[_SPORT] in ports or ev[_DPORT] in ports)


def own_rows(events, ports: set[int], gens: frozenset[int] | set[int] = frozenset()):
    """is_own on EVENT_DTYPE columns: a boolean mask, row for row the same answers."""
    import numpy as np
    p = np.fromiter(ports, dtype=np.int64, count=len(ports))
    sport, dport, gen = events["sport"], events["dport"], events["gen"]
    by_ports = (np.isin(sport, p) | (sport == 0)) & (np.isin(dport, p) | (dport == 0)) & \
        (np.isin(sport, p) | np.isin(dport, p))
    if not gens:
        return by_ports
    by_gen = np.isin(gen, np.fromiter(gens, dtype=np.uint64, count=len(gens)))
    return np.where(gen != 0, by_gen, by_ports)


def expected_ends(mode: str) -> int:
    """Records that end the check: each of the connection's two sockets ends with a CLOSE event
    (stream) and/or a folded record (aggregate), and the listener with a CLOSE event."""
    return {"stream": 2, "aggregate": 2, "both": 4}.get(mode, 2) + 1


def check(stream, offsets_known: set[str], family: int | None = None,
          mode: str = "stream") -> tuple[list, str | None, list, tuple[set[int], set[int]]]:
    """Make the connection, read its events back from `stream`; returns (the other events
    read meanwhile, to be consumed as usual; what read wrong, or None; our own events; the
    ports and generations that tell later stragglers of ours, see is_own). Our
    own events are not passed on: they are the tracer's, not the workload's (the kernel's
    counters of emitted events include them)."""
    ports, n = _connection(6 if family == 6 else 4, getattr(stream, "program", None))
    others, mine = [], []
    deadline = time.monotonic() + WAIT_S
    closes = 0
    while time.monotonic() < deadline and closes < expected_ends(mode):
        for ev in stream.poll(20):
            if is_own(ev, ports):
                mine.append(ev)
                closes += ev[_KIND] == _LIFE or (ev[_KIND] == _STATE and ev[_NEW] == _CLOSE)
            else:
                others.append(ev)
    # reads, writes and the EOF carry no ports, only the connection's generation: without
    # this they went on as a connection of the tracer's own, open forever (birth unseen)
    gens = {ev[_GEN] for ev in mine if ev[_GEN]}
    if gens:
        mine += [ev for ev in others if ev[_GEN] in gens]
        others = [ev for ev in others if ev[_GEN] not in gens]
    if not mine:
        return others, None, mine, (ports, gens)  # nothing came back (say, a kernel that filters): nothing judged
    netns = os.stat("/proc/self/ns/net").st_ino
    wrong = []
    if {"OFF_SKC_NET", "OFF_NET_NS_INUM"} <= offsets_known:
        bad = {ev[_NETNS] for ev in mine} - {netns}
        if bad:
            wrong.append(f"netns {sorted(bad)[0]} for our own socket, not {netns} (/proc/self/ns/net)")
    if "OFF_SK_UID" in offsets_known:
        bad = {ev[_UID] for ev in mine} - {os.geteuid()}
        if bad:
            wrong.append(f"uid {sorted(bad)[0]} for our own socket, not {os.geteuid()}")
    if {"OFF_TP_BYTES_ACKED", "OFF_TP_BYTES_RECEIVED"} <= offsets_known:
        # at CLOSE each side has sent and received the payload, plus its SYN and FIN at most
        ends = [ev for ev in mine if ev[_DPORT] and (ev[_KIND] == _LIFE or (ev[_KIND] == _STATE and ev[_NEW] == _CLOSE))]  # (not the listener's)
        bad = [(ev[_TX], ev[_RX]) for ev in ends if not (n <= ev[_TX] <= n + 2 and n <= ev[_RX] <= n + 2)]
        if bad:
            wrong.append(f"{bad[0][0]} bytes sent and {bad[0][1]} received at CLOSE, not {n} each")
    return others, "; ".join(wrong) or None, mine, (ports, gens)
