"""Every TCP socket the kernel holds, from sock_diag, in every network namespace.

This sees what the tracepoint cannot: sockets opened before the trace, TIME_WAIT
and orphaned FIN_WAIT2 minisockets (inode 0, a timer), and SYN_RECV request
sockets of half-open handshakes (kernel-facts §5). Each namespace is dumped
through a netlink socket opened inside it.

A host under TIME_WAIT churn holds 100k-300k sockets, so the replies are parsed here
from the raw bytes (the fixed inet_diag_msg of every socket in one numpy pass, each
address formatted once): `dump_here_reference`, pyroute2's parse of the same dump, is
what tests/test_sock_diag_fast.py holds it equal to and bench/sock_look.py times it against.
"""
from __future__ import annotations

import errno
import gc
import ipaddress
import os
import socket
import struct
from itertools import repeat
from typing import NamedTuple

import numpy as np
from pyroute2.netlink.diag import DiagSocket

from . import health as health_mod
from . import netns as netns_mod
from .tcp_states import TcpState as S
from .unique_rows import unique_rows

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

# netlink and inet_diag (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLA_TYPE_MASK = 0x3FFF             # without NLA_F_NESTED, NLA_F_NET_BYTEORDER
ATTR_INFO, ATTR_CGROUP_ID = 2, 21  # INET_DIAG_INFO, INET_DIAG_CGROUP_ID (the kernel adds the latter
#                                    to every full socket's reply, unasked)
RECV_ROOM = 1 << 20                # each recv has at least this much room (a dump datagram is <= 32 KiB)
_NLMSG = struct.Struct("=IH")      # nlmsg_len, nlmsg_type
_NLA = struct.Struct("=HH")        # nla_len, nla_type
_ERRNO = struct.Struct("=i")
_U32, _U64 = struct.Struct("=I"), struct.Struct("=Q")
# the request: nlmsghdr, inet_diag_req_v2 (family, protocol, ext, pad, states, a zero inet_diag_sockid)
_REQUEST = struct.Struct("=IHHII BBBxI 48x")
# a reply: nlmsghdr, then inet_diag_msg (72 bytes), then its attributes
_HEAD = 16 + 72
_MSG = np.dtype({
    "names": ["len", "family", "state", "timer", "retrans", "sport", "dport", "src", "dst",
              "expires", "rqueue", "wqueue", "uid", "inode"],
    "formats": ["=u4", "u1", "u1", "u1", "u1", ">u2", ">u2", ("u1", 16), ("u1", 16),
                "=u4", "=u4", "=u4", "=u4", "=u4"],
    "offsets": [0, 16, 17, 18, 19, 20, 22, 24, 40, 68, 72, 76, 80, 84],
    "itemsize": _HEAD})
_GATHER_ROWS = 1 << 14             # headers copied out per numpy gather (bounds its index array)
_TIMER_NAMES = np.array([TIMERS.get(t, str(t)) for t in range(256)], dtype=object)
# tcp_info fields read here (byte offsets in struct tcp_info, include/uapi/linux/tcp.h)
_TCPI_RTO, _TCPI_LAST_DATA_SENT, _TCPI_LAST_DATA_RECV, _TCPI_LAST_ACK_RECV = 8, 44, 52, 56


def _addr(text: str) -> tuple[str, int]:
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), 4
    return str(ip), ip.version


def _addr_of(family: int, raw: bytes) -> tuple[str, int]:
    """The _addr rule on an address as inet_diag gives it (16 bytes; an AF_INET one in the first 4)."""
    return _addr(str(ipaddress.IPv4Address(raw[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(raw)))


def _request(family: int, states: int, ext: int) -> bytes:
    return _REQUEST.pack(_REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0,
                         family, socket.IPPROTO_TCP, ext, states)


def _failed(err: int, what: str) -> OSError:
    return OSError(err, f"{os.strerror(err)} (sock_diag: {what})")


def _walk(buf: bytearray, at: int, end: int, offsets: list[int]) -> bool:
    """The messages of one reply datagram, buf[at:end]: each socket's offset appended; True once
    the dump is done. An error the kernel reports (NLMSG_ERROR, or NLMSG_DONE's negative
    errno: a dump that failed half way) is raised, never taken for the end."""
    unpack, add = _NLMSG.unpack_from, offsets.append
    while at < end:
        length, kind = unpack(buf, at)
        if length < 16 or at + length > end:
            raise OSError(errno.EPROTO, f"a malformed netlink message in the sock_diag reply (length {length})")
        if kind == SOCK_DIAG_BY_FAMILY:
            if length < _HEAD:
                raise OSError(errno.EPROTO, f"a sock_diag message of {length} bytes, shorter than inet_diag_msg")
            add(at)
        elif kind == NLMSG_DONE:
            code = _ERRNO.unpack_from(buf, at + 16)[0] if length >= 20 else 0
            if code < 0:
                raise _failed(-code, "the dump failed")
            return True
        elif kind == NLMSG_ERROR:
            code = _ERRNO.unpack_from(buf, at + 16)[0] if length >= 20 else -errno.EPROTO
            if code < 0:
                raise _failed(-code, "the request was refused")
        elif kind == NLMSG_OVERRUN:
            raise _failed(errno.ENOBUFS, "the reply overran")
        at += (length + 3) & ~3
    return False


def _receive(families: tuple[int, ...], states: int, ext: int) -> tuple[bytearray, list[int]]:
    """The dump of each family in turn, over one netlink socket opened here (in this thread's
    namespace): every reply datagram appended to one buffer, and the offset of each socket's message."""
    buf, used, offsets = bytearray(RECV_ROOM), 0, []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        s.bind((0, 0))
        for family in families:
            s.sendto(_request(family, states, ext), (0, 0))
            done = False
            while not done:
                if len(buf) - used < RECV_ROOM:
                    buf.extend(bytes(max(RECV_ROOM, len(buf))))
                room = len(buf) - used
                n = s.recv_into(memoryview(buf)[used:], room, socket.MSG_TRUNC)
                if n > room:    # (MSG_TRUNC: the datagram's own length; what did not fit is lost)
                    raise OSError(errno.EMSGSIZE, f"a sock_diag reply of {n} bytes, larger than the "
                                                  f"{room}-byte buffer")
                if n == 0:
                    raise OSError(errno.EPROTO, "the sock_diag dump ended without NLMSG_DONE")
                done = _walk(buf, used, used + n, offsets)
                used = (used + n + 3) & ~3      # (every message 4-aligned in buf: _headers reads it as u32)
    return buf, offsets


def _headers(words: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Every socket's nlmsghdr + inet_diag_msg as one structured array (_MSG), in order; words:
    the reply buffer as u32, at: each socket message's offset in words (messages are 4-aligned)."""
    span = np.arange(_HEAD // 4)
    out = np.empty(len(at), dtype=_MSG)
    flat = out.view(np.uint32).reshape(len(at), _HEAD // 4)
    for i in range(0, len(at), _GATHER_ROWS):
        flat[i:i + _GATHER_ROWS] = words[at[i:i + _GATHER_ROWS, None] + span]
    return out


def _addresses(family: np.ndarray, src: np.ndarray, dst: np.ndarray) -> tuple[list, list, list]:
    """(laddr, family 4/6 of laddr, raddr) as lists, each distinct address formatted once."""
    n = len(family)
    both = np.concatenate([src, dst])                       # (2n, 16) bytes
    is4 = np.concatenate([family, family]) == socket.AF_INET
    number = np.empty(2 * n, dtype=np.int64)
    texts: list[str] = []
    families: list[int] = []
    for rows, af in ((np.flatnonzero(is4), socket.AF_INET), (np.flatnonzero(~is4), socket.AF_INET6)):
        if not len(rows):
            continue
        if af == socket.AF_INET:                            # (its address: the first 4 bytes, the rest 0)
            raw = np.ascontiguousarray(both[rows, :4])
            first, number[rows] = unique_rows(raw.view("<u4"))
        else:
            raw = both[rows]
            halves = raw.view("<u8")
            first, number[rows] = unique_rows(halves)
        number[rows] += len(texts)
        for text, fam in (_addr_of(af, raw[i].tobytes()) for i in first.tolist()):
            texts.append(text)
            families.append(fam)
    text_of, family_of = np.array(texts, dtype=object), np.array(families, dtype=object)
    return text_of[number[:n]].tolist(), family_of[number[:n]].tolist(), text_of[number[n:]].tolist()


def _attributes(buf: bytearray, words: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> tuple[list, list, list]:
    """(INET_DIAG_INFO payloads, INET_DIAG_CGROUP_ID values) per socket, None where absent (the
    first of each, read by walking the attribute headers), and the sockets with a payload. A
    message whose one attribute is neither (INET_DIAG_SHUTDOWN of a TIME_WAIT socket,
    INET_DIAG_MARK of a request socket) is told in one numpy pass over the first attribute
    headers, and not walked."""
    n = len(at)
    info, cgroup, with_info = [None] * n, [None] * n, []
    some = np.flatnonzero(lengths > _HEAD)
    first = words[at[some] + _HEAD // 4].astype(np.int64)
    first_len, first_kind = first & 0xFFFF, (first >> 16) & NLA_TYPE_MASK
    alone = _HEAD + ((first_len + 3) & ~3) == lengths[some]
    walk = some[~(alone & (first_kind != ATTR_INFO) & (first_kind != ATTR_CGROUP_ID))]
    unpack = _NLA.unpack_from
    for i in walk.tolist():
        start = int(at[i]) * 4
        end, a = start + int(lengths[i]), start + _HEAD
        while a + 4 <= end:
            length, kind = unpack(buf, a)
            if length < 4 or a + length > end:
                raise OSError(errno.EPROTO, f"a malformed attribute in the sock_diag reply (length {length})")
            kind &= NLA_TYPE_MASK
            if kind == ATTR_INFO and info[i] is None:
                info[i] = bytes(buf[a + 4:a + length])
                with_info.append(i)
            elif kind == ATTR_CGROUP_ID and cgroup[i] is None and length >= 12:
                cgroup[i] = _U64.unpack_from(buf, a + 4)[0]
            a += (length + 3) & ~3
    return info, cgroup, with_info


def _field(raw: bytes, offset: int) -> int | None:
    """A u32 of tcp_info, None beyond the end of the struct the kernel sent."""
    return _U32.unpack_from(raw, offset)[0] if offset + 4 <= len(raw) else None


def dump_here(ns_inode: int, states: int = ALL_STATES, info: bool = True) -> list[Sock]:
    """TCP sockets of the calling thread's namespace, IPv4 and IPv6."""
    buf, offsets = _receive((socket.AF_INET, socket.AF_INET6), states, INET_DIAG_INFO if info else 0)
    n = len(offsets)
    if not n:
        return []
    words = np.frombuffer(buf, dtype=np.uint32, count=len(buf) // 4)
    at = np.asarray(offsets, dtype=np.int64) // 4
    m = _headers(words, at)
    laddr, family, raddr = _addresses(m["family"], m["src"], m["dst"])
    infos, cgroups, with_info = _attributes(buf, words, at, m["len"])
    state = m["state"].tolist()
    idle_r, idle_s, ack_r, rto, health_ = ([None] * n for _ in range(5))
    for i in with_info:
        raw = infos[i]
        if state[i] == S.LISTEN:
            continue
        # (probes/socket_age.py says which of these bound the time in which state)
        ack_r[i], rto[i] = _field(raw, _TCPI_LAST_ACK_RECV), (_field(raw, _TCPI_RTO) or 0) / 1000
        if state[i] != S.SYN_SENT:
            idle_r[i], idle_s[i] = _field(raw, _TCPI_LAST_DATA_RECV), _field(raw, _TCPI_LAST_DATA_SENT)
        health_[i] = health_mod.from_tcp_info(raw)
    rows = zip(repeat(ns_inode, n), family, state, laddr, m["sport"].tolist(), raddr, m["dport"].tolist(),
               m["inode"].tolist(), m["uid"].tolist(), _TIMER_NAMES[m["timer"]].tolist(),
               m["expires"].tolist(), m["retrans"].tolist(), m["rqueue"].tolist(), m["wqueue"].tolist(),
               idle_r, idle_s, ack_r, rto, health_, cgroups)
    # n new tuples at once: the collections they would trigger (each walking the tuples made so
    # far, and the full ones the rest of the heap) cost more than the parse; they run later
    collecting = gc.isenabled()
    gc.disable()
    try:
        return list(map(tuple.__new__, repeat(Sock, n), rows))
    finally:
        if collecting:
            gc.enable()


def dump(ns: netns_mod.Netns, states: int = ALL_STATES, info: bool = True) -> list[Sock]:
    with netns_mod.entered(ns):
        return dump_here(ns.inode, states, info)


# --- the reference: pyroute2's parse of the same dump, as dump_here was before it parsed
# the bytes itself (tests/test_sock_diag_fast.py compares the two, bench/sock_look.py times them)

def _raw_info(info) -> bytes:
    """INET_DIAG_INFO's payload as the kernel sent it, after its 4-byte attribute header (its
    own length: an older kernel's tcp_info is shorter)."""
    return bytes(info.data[info.offset + 4:info.offset + info.length])


def _record(ns_inode: int, m) -> Sock:
    state = m["idiag_state"]
    laddr, fam = _addr(m["idiag_src"])
    raddr, _ = _addr(m["idiag_dst"])
    idle_r = idle_s = ack_r = rto = health_ = None
    info = m.get_attr("INET_DIAG_INFO")
    if info is not None and state != S.LISTEN:
        ack_r, rto = info.get("tcpi_last_ack_recv"), info.get("tcpi_rto", 0) / 1000
        if state != S.SYN_SENT:
            idle_r, idle_s = info.get("tcpi_last_data_recv"), info.get("tcpi_last_data_sent")
        health_ = health_mod.from_tcp_info(_raw_info(info))
    return Sock(ns_inode, fam, state, laddr, m["idiag_sport"], raddr, m["idiag_dport"],
                m["idiag_inode"], m["idiag_uid"], TIMERS.get(m["idiag_timer"], str(m["idiag_timer"])),
                m["idiag_expires"], m["idiag_retrans"], m["idiag_rqueue"], m["idiag_wqueue"],
                idle_r, idle_s, ack_r, rto, health_, m.get_attr("INET_DIAG_CGROUP_ID"))


def dump_here_reference(ns_inode: int, states: int = ALL_STATES, info: bool = True) -> list[Sock]:
    """dump_here through pyroute2's DiagSocket and its message objects (about 20 us a socket)."""
    out = []
    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=states,
                                       extensions=INET_DIAG_INFO if info else 0):
                out.append(_record(ns_inode, m))
    return out
