"""Import text captured with bcc's `tcpstates -T -w` or libbpf-tools' `tcpstates -T -w`.

Each line becomes a state event, so the same frames can be built. What such a
capture does not have stays unknown: the owner (its PID is whatever task the
kernel ran, tcplife-trace's cur_pid), netns, uid, byte counts, resets, errno.
Times: the line's HH:MM:SS for each connection's first transition, then the MS
column (time in the old state) for the exact spacing of the following ones.
A new connection starts at each birth (CLOSE->SYN_SENT, CLOSE->LISTEN,
LISTEN->SYN_RECV), so a reused socket address does not merge two connections.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import socket

from .analysis.lifecycle import BIRTHS
from .probes.event_layout import EventKind, Flag
from .probes.tcp_states import TcpState

UNKNOWN = ("owner (the PID column is the task the kernel ran)", "netns", "uid", "bytes",
           "resets", "errno", "sub-second start times")
_STATES = {s.name: int(s) for s in TcpState}
_BIRTHS = {(TcpState(a).name, TcpState(b).name) for a, b in BIRTHS}
_HMS = re.compile(r"^\d\d:\d\d:\d\d$")


def looks_like_tcpstates(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    return "SKADDR" in first and "OLDSTATE" in first and "NEWSTATE" in first


def _raw(family: int, text: str) -> bytes:
    if family == 4:
        return socket.inet_pton(socket.AF_INET, text) + b"\0" * 12
    return socket.inet_pton(socket.AF_INET6, text)


def _line(tok: list[str], has_ip: bool, day: dt.date) -> dict:
    i = tok.index("->")
    if not _HMS.match(tok[0]):
        raise ValueError("no HH:MM:SS time (capture with -T)")
    laddr = tok[i - 5]
    hms = dt.datetime.combine(day, dt.time.fromisoformat(tok[0])).astimezone()
    return {"old": tok[i - 1], "new": tok[i + 1], "ms": float(tok[i + 2]),
            "laddr": laddr, "lport": int(tok[i - 4]), "raddr": tok[i - 3], "rport": int(tok[i - 2]),
            "skaddr": tok[1], "pid": int(tok[2]),
            "comm": " ".join(tok[3:i - 6 if has_ip else i - 5]),
            "family": int(tok[i - 6]) if has_ip else (6 if ":" in laddr else 4),
            "wall_ns": int(hms.timestamp()) * 1_000_000_000}


def _chains(lines: list[dict]) -> list[list[dict]]:
    """One socket address's lines -> connections, each in state order.

    Per-CPU perf buffers deliver a socket's events out of order (a CLOSE_WAIT->LAST_ACK
    before the ESTABLISHED->CLOSE_WAIT that led to it), so each connection is rebuilt by
    following its states: from a birth (or the first line), the next line whose old
    state is where the previous one led."""
    pending = list(lines)
    out = []
    while pending:
        start = next((ln for ln in pending if (ln["old"], ln["new"]) in _BIRTHS), pending[0])
        pending.remove(start)
        chain, state = [start], start["new"]
        while True:
            # a no-op (FIN_WAIT1 -> FIN_WAIT1 after shutdown) comes before leaving the state
            nxt = next((ln for ln in pending if ln["old"] == state == ln["new"]), None) or \
                next((ln for ln in pending if ln["old"] == state and (ln["old"], ln["new"]) not in _BIRTHS),
                     None)
            if nxt is None:
                break
            pending.remove(nxt)
            chain.append(nxt)
            state = nxt["new"]
        out.append(chain)
    return out


def parse(path: str) -> tuple[list[tuple], int, list[str]]:
    """(events in `Ev` order, mono_to_wall offset, warnings)."""
    with open(path, errors="replace") as f:
        text = f.read().splitlines()
    day = dt.datetime.fromtimestamp(os.path.getmtime(path)).date()
    by_skaddr: dict[str, list[dict]] = {}
    has_ip, bad = False, 0
    for ln in text:
        tok = ln.split()
        if not tok:
            continue
        if "OLDSTATE" in tok:
            has_ip = "IP" in tok
            continue
        try:
            rec = _line(tok, has_ip, day)
            if rec["old"] not in _STATES or rec["new"] not in _STATES:
                raise KeyError(rec["old"])
            by_skaddr.setdefault(rec["skaddr"], []).append(rec)
        except (ValueError, IndexError, KeyError):
            bad += 1
    events, gen = [], 0
    for lines in by_skaddr.values():
        for chain in _chains(lines):
            gen += 1
            first = chain[0]
            born = (first["old"], first["new"]) in _BIRTHS
            ts = first["wall_ns"]
            for seq, ln in enumerate(chain):
                if seq:
                    ts += int(ln["ms"] * 1e6)
                flags = 0 if born or seq else int(Flag.BIRTH_UNSEEN)
                fam = ln["family"]
                events.append((ts, int(ln["skaddr"], 16), gen, 0, 0, 0, ln["pid"], ln["pid"], 0, 0,
                               ln["lport"], ln["rport"], socket.AF_INET if fam == 4 else socket.AF_INET6,
                               int(EventKind.STATE), _STATES[ln["old"]], _STATES[ln["new"]], flags,
                               _raw(fam, ln["laddr"]), _raw(fam, ln["raddr"]),
                               ln["comm"].encode()[:16].ljust(16, b"\0"), seq % 65536))
    events.sort(key=lambda ev: ev[0])
    warnings = []
    if bad:
        warnings.append(f"{path}: {bad} line(s) not understood as tcpstates -T -w output, skipped")
    warnings.append(f"{path}: imported from tcpstates text; unknown: {', '.join(UNKNOWN)}")
    return events, 0, warnings
