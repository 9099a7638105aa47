"""Every TCP socket the kernel holds, from sock_diag (pyroute2), in every network namespace.

This sees what the tracepoint cannot: sockets opened before the trace, TIME_WAIT
and orphaned FIN_WAIT2 minisockets (inode 0, a timer), and SYN_RECV request
sockets of half-open handshakes (kernel-facts §5). Each namespace is dumped
through a netlink socket opened inside it.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

from pyroute2.netlink.diag import DiagSocket

from . import health as health_mod
from . import netns as netns_mod
from .tcp_states import TcpState as S

INET_DIAG_INFO = 1 << (2 - 1)
ALL_STATES = (1 << 12) - 1
TIMERS = {0: "off", 1: "on", 2: "keepalive", 3: "timewait", 4: "persist"}
# the periodic poll skips the states that are cheap to follow from the trace and can be
# numerous (ESTABLISHED, TIME_WAIT); the first and last snapshots take everything
POLL_STATES = ALL_STATES & ~((1 << S.ESTABLISHED) | (1 << S.TIME_WAIT))


class Sock(NamedTuple):
    netns: int
    family: int          # 4 or 6 (v4-mapped IPv6 counts as 4, as in the trace)
    state: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    inode: int           # 0: no file (TIME_WAIT, request sockets, orphans)
    uid: int
    timer: str
    expires_ms: int
    retrans: int
    rqueue: int          # LISTEN: accept queue length; else bytes unread
    wqueue: int          # LISTEN: backlog limit; else bytes unsent
    idle_recv_ms: int | None   # tcp_info last_data_recv (full sockets past SYN_SENT)
    idle_sent_ms: int | None   # tcp_info last_data_sent
    ack_recv_ms: int | None = None  # tcp_info last_ack_recv (full sockets but listeners)
    rto_ms: float | None = None     # tcp_info rto: the retransmission timeout now, backoff included
    health: dict | None = None      # HEALTH_COLUMNS from tcp_info (full sockets past LISTEN); None: no tcp_info
    cgroup_id: int | None = None    # INET_DIAG_CGROUP_ID: the cgroup v2 of the task that made the socket


HEALTH_COLUMNS = health_mod.COLUMNS


def _raw_info(info) -> bytes:
    """INET_DIAG_INFO's payload as the kernel sent it, after its 4-byte attribute header (its
    own length: an older kernel's tcp_info is shorter)."""
    return bytes(info.data[info.offset + 4:info.offset + info.length])


def _addr(text: str) -> tuple[str, int]:
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), 4
    return str(ip), ip.version


def _record(ns_inode: int, m) -> Sock:
    state = m["idiag_state"]
    laddr, fam = _addr(m["idiag_src"])
    raddr, _ = _addr(m["idiag_dst"])
    idle_r = idle_s = ack_r = rto = health_ = None
    info = m.get_attr("INET_DIAG_INFO")
    if info is not None and state != S.LISTEN:
        # (probes/socket_age.py says which of these bound the time in which state)
        ack_r, rto = info.get("tcpi_last_ack_recv"), info.get("tcpi_rto", 0) / 1000
        if state != S.SYN_SENT:
            idle_r, idle_s = info.get("tcpi_last_data_recv"), info.get("tcpi_last_data_sent")
        health_ = health_mod.from_tcp_info(_raw_info(info))
    return Sock(ns_inode, fam, state, laddr, m["idiag_sport"], raddr, m["idiag_dport"],
                m["idiag_inode"], m["idiag_uid"], TIMERS.get(m["idiag_timer"], str(m["idiag_timer"])),
                m["idiag_expires"], m["idiag_retrans"], m["idiag_rqueue"], m["idiag_wqueue"],
                idle_r, idle_s, ack_r, rto, health_, m.get_attr("INET_DIAG_CGROUP_ID"))


def dump_here(ns_inode: int, states: int = ALL_STATES, info: bool = True) -> list[Sock]:
    """TCP sockets of the calling thread's namespace, IPv4 and IPv6."""
    out = []
    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=states,
                                       extensions=INET_DIAG_INFO if info else 0):
                out.append(_record(ns_inode, m))
    return out


def dump(ns: netns_mod.Netns, states: int = ALL_STATES, info: bool = True) -> list[Sock]:
    with netns_mod.entered(ns):
        return dump_here(ns.inode, states, info)
