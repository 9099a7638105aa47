"""Synthetic event streams written as small tables, for the state machine tests.

Each row: (ms, kind, gen, detail...) where detail depends on the kind:
  "S"  state change:  (ms, "S", gen, old, new, pid[, sport, dport])
  "D"  destroy:       (ms, "D", gen)
  "RR" reset received (ms, "RR", gen)
  "RS" reset sent:    (ms, "RS", gen, reason, state)
  "E"  errno report:  (ms, "E", gen, errno[, sport, dport])   gen 0 = no socket pointer
  "IO" first I/O:     (ms, "IO", gen, pid[, "eof"])   "eof": that read returned 0
  "EOF" EOF seen:     (ms, "EOF", gen, pid)
  "F"  filtered:      (ms, "F", gen)
"""
from __future__ import annotations

import socket

from tcplife_trace.probes.decode import Ev
from tcplife_trace.probes.event_layout import EventKind, Flag
from tcplife_trace.probes.tcp_states import TcpState as S

KINDS = {"S": EventKind.STATE, "D": EventKind.DESTROY, "RR": EventKind.RECV_RESET,
         "RS": EventKind.SEND_RESET, "E": EventKind.ERROR, "IO": EventKind.IO_OWNER,
         "EOF": EventKind.EOF, "F": EventKind.FILTERED}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _raw_addr(family, text):
    if family == 4:
        return socket.inet_pton(socket.AF_INET, text) + b"\0" * 12
    return socket.inet_pton(socket.AF_INET6, text)


def ev(ms, kind, gen, *rest, skaddr=None, netns=4026531833, unseen=False, laddr="127.0.0.1",
       raddr="127.0.0.1", family=4) -> Ev:
    k = KINDS[kind]
    pid = 0
    old = new = value = 0
    sport = dport = 0
    af, sa, da = 0, b"\0" * 16, b"\0" * 16
    if k == EventKind.STATE:
        old, new, pid = S[rest[0]], S[rest[1]], rest[2]
        sport, dport = (rest[3], rest[4]) if len(rest) > 3 else (0, 0)
        af, sa, da = AF[family], _raw_addr(family, laddr), _raw_addr(family, raddr)
    elif k == EventKind.SEND_RESET:
        value, old = rest[0], S[rest[1]]
    elif k == EventKind.ERROR:
        value = rest[0]
        sport, dport = (rest[1], rest[2]) if len(rest) > 1 else (0, 0)
        af, sa, da = AF[family], _raw_addr(family, laddr), _raw_addr(family, raddr)
    elif k in (EventKind.IO_OWNER, EventKind.EOF):
        pid = rest[0]
    flags = Flag.NETNS | Flag.UID | (Flag.BIRTH_UNSEEN if unseen else 0)
    if k == EventKind.EOF or (k == EventKind.IO_OWNER and len(rest) > 1 and rest[1] == "eof"):
        flags |= Flag.EOF
    if skaddr is None:
        skaddr = 0xFFFF0000 + gen if gen else 0
    comm = f"p{pid}".encode().ljust(16, b"\0")
    return Ev(int(ms * 1e6), skaddr, gen, 0, 0, netns, pid, pid, 0, value, sport, dport, af, int(k),
              int(old), int(new), int(flags), sa, da, comm, 0)


def stream(rows) -> list[Ev]:
    out = []
    for row in rows:
        kw = row[-1] if isinstance(row[-1], dict) else {}
        if kw:
            row = row[:-1]
        out.append(ev(*row, **kw))
    return out
