"""sock_diag.dump_here (the raw netlink parse) returns what pyroute2's parse of the same dump
returns (dump_here_reference): the same Sock records, field by field, in the same order, on
the real kernel, for a namespace of our own holding a socket of every kind the looks meet:
listeners, ESTABLISHED with unread data, CLOSE_WAIT, FIN_WAIT2 (open and orphaned), a few
thousand TIME_WAIT, SYN_SENT and SYN_RECV (the peer's SYN-ACKs dropped), IPv6, and
v4-mapped IPv6 (a dual-stack listener's connections from 127.0.0.1)."""
from __future__ import annotations

import errno
import socket
import time

import pytest

from netpair import A_ADDR, B_ADDR, NetPair
from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import sock_diag
from tcplife_trace.probes.tcp_states import TcpState as S

pytestmark = pytest.mark.privileged

TIME_WAIT_V4, TIME_WAIT_V6, TIME_WAIT_MAPPED = 3000, 200, 200
HALF_OPEN = 3
# kernel clocks that move between two dumps taken back to back: counting down (expires_ms)
# or up (ms since the last data or ack)
CLOCKS_DOWN = ("expires_ms",)
CLOCKS_UP = ("idle_recv_ms", "idle_sent_ms", "ack_recv_ms")
# sockets whose other fields may change between two dumps (a SYN or SYN-ACK retransmitted:
# retrans, rto, health, a re-armed timer): a mismatch there is retried, anywhere else it fails
MOVING = (S.SYN_SENT, S.SYN_RECV)
KEY = ("netns", "family", "state", "laddr", "lport", "raddr", "rport")


def _ns(pair: NetPair, name: str) -> netns_mod.Netns:
    return netns_mod.Netns(pair.inode(name), f"/run/netns/{name}", name)


def _pairs(listener: socket.socket, family: int, addr: str, count: int) -> list[tuple[socket.socket, socket.socket]]:
    out = []
    for _ in range(count):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.connect((addr, listener.getsockname()[1]))
        s, _ = listener.accept()
        out.append((c, s))
    return out


def _time_wait(listener: socket.socket, family: int, addr: str, count: int) -> None:
    """count connections whose client closes first: each leaves a TIME_WAIT socket."""
    for c, s in _pairs(listener, family, addr, count):
        c.close()
        s.close()


class Zoo:
    """Sockets of every kind in namespace a (loopback), and half-open handshakes from a to b."""

    def __init__(self, pair: NetPair):
        self.a, self.b = _ns(pair, pair.a), _ns(pair, pair.b)
        self.held: list[socket.socket] = []
        answers = []
        pair.blackhole(pair.b, A_ADDR)          # b's SYN-ACKs to a leave and are dropped
        with netns_mod.entered(self.b):
            half = socket.create_server((B_ADDR, 0), backlog=16)
        self.half_port = half.getsockname()[1]
        self.held.append(half)
        with netns_mod.entered(self.a):
            v4 = socket.create_server(("127.0.0.1", 0), backlog=64)
            v6 = socket.create_server(("::1", 0), family=socket.AF_INET6, backlog=64)
            dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
            self.dual_port = dual.getsockname()[1]
            self.held += [v4, v6, dual]
            for listener, family, addr in ((v4, socket.AF_INET, "127.0.0.1"), (v6, socket.AF_INET6, "::1"),
                                           (dual, socket.AF_INET, "127.0.0.1")):
                (c1, s1), (c2, s2), (c3, s3), (c4, s4) = _pairs(listener, family, addr, 4)
                c1.sendall(b"x" * 1000)          # ESTABLISHED, 1000 bytes unread at s1
                answers.append(s1)
                c2.shutdown(socket.SHUT_WR)     # c2 FIN_WAIT2 (open), s2 CLOSE_WAIT
                c3.close()                      # c3 FIN_WAIT2 orphaned (a minisocket), s3 CLOSE_WAIT
                self.held += [c1, s1, c2, s2, s3, c4, s4]
            _time_wait(v4, socket.AF_INET, "127.0.0.1", TIME_WAIT_V4)
            _time_wait(v6, socket.AF_INET6, "::1", TIME_WAIT_V6)
            _time_wait(dual, socket.AF_INET6, "::ffff:127.0.0.1", TIME_WAIT_MAPPED)
            for _ in range(HALF_OPEN):
                c = socket.socket()
                c.setblocking(False)
                assert c.connect_ex((B_ADDR, self.half_port)) in (errno.EINPROGRESS, 0)
                self.held.append(c)
        time.sleep(0.4)
        for s in answers:                       # (the last data received and sent 0.4 s apart)
            s.sendall(b"y" * 10)
        time.sleep(0.5)                         # the last ACKs and FINs settled

    def close(self) -> None:
        for s in self.held:
            s.close()


@pytest.fixture(scope="module")
def zoo():
    with NetPair("sdf") as pair:
        z = Zoo(pair)
        try:
            yield z
        finally:
            z.close()


def _reference(ns: netns_mod.Netns, states: int, info: bool) -> list[sock_diag.Sock]:
    with netns_mod.entered(ns):
        return sock_diag.dump_here_reference(ns.inode, states, info)


def _mismatches(before, ref, after) -> list[tuple[int, str, object, object]]:
    """(index, field, ours, the reference's) where the reference, taken between our two dumps,
    is not what ours say: every field equal, each clock between ours (it moved monotonically)."""
    out = []
    if len(before) != len(ref) or len(after) != len(ref):
        return [(-1, "count", (len(before), len(after)), len(ref))]
    for i, (b, r, a) in enumerate(zip(before, ref, after)):
        for name in sock_diag.Sock._fields:
            mine, theirs, later = getattr(b, name), getattr(r, name), getattr(a, name)
            if name in CLOCKS_DOWN + CLOCKS_UP and None not in (mine, theirs, later):
                low, high = (later, mine) if name in CLOCKS_DOWN else (mine, later)
                if not low <= theirs <= high:
                    out.append((i, name, (mine, later), theirs))
            elif mine != theirs or type(mine) is not type(theirs) or later != theirs:
                out.append((i, name, (mine, later), theirs))
    return out


def _compare(ns: netns_mod.Netns, states: int = sock_diag.ALL_STATES, info: bool = True,
             attempts: int = 5) -> list[sock_diag.Sock]:
    for _ in range(attempts):
        before = sock_diag.dump(ns, states, info)
        ref = _reference(ns, states, info)
        after = sock_diag.dump(ns, states, info)
        bad = _mismatches(before, ref, after)
        if not bad:
            return before
        fixed = [i for i, *_ in bad if i < 0 or ref[i].state not in MOVING]
        assert not fixed, [(ref[i] if i >= 0 else None, name, ours, theirs) for i, name, ours, theirs in bad[:10]]
    pytest.fail(f"sockets kept moving between the dumps: {bad[:10]}")


def test_same_records_as_pyroute2_every_kind(zoo):
    socks = _compare(zoo.a)
    by_state = {}
    for s in socks:
        by_state.setdefault(s.state, []).append(s)
    assert len(by_state[S.TIME_WAIT]) >= TIME_WAIT_V4 + TIME_WAIT_V6 + TIME_WAIT_MAPPED
    assert len(by_state[S.LISTEN]) == 3
    assert len(by_state[S.SYN_SENT]) == HALF_OPEN
    assert {s.family for s in socks} == {4, 6}
    for state in (S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT2):
        assert len(by_state[state]) >= 3, state
    # FIN_WAIT2 both open (inode, tcp_info) and orphaned (a minisocket: no inode, no tcp_info)
    assert {s.inode != 0 for s in by_state[S.FIN_WAIT2]} == {True, False}
    full = [s for s in socks if s.inode and s.state != S.LISTEN]
    assert full and all(s.health is not None and s.rto_ms and s.cgroup_id is not None for s in full)
    assert all(s.health is None and s.cgroup_id is None for s in by_state[S.TIME_WAIT])
    assert any(s.rqueue == 1000 for s in by_state[S.ESTABLISHED])
    # the dual-stack listener's connections from 127.0.0.1: AF_INET6 sockets told as IPv4
    mapped = [s for s in socks if s.lport == zoo.dual_port and s.state != S.LISTEN]
    assert mapped and all(s.family == 4 and s.laddr == s.raddr == "127.0.0.1" for s in mapped)
    assert [s.laddr for s in socks if s.lport == zoo.dual_port and s.state == S.LISTEN] == ["::"]
    assert any(s.family == 6 and s.laddr == "::1" for s in by_state[S.TIME_WAIT])


def test_same_records_half_open_listener_side(zoo):
    socks = _compare(zoo.b)
    half = [s for s in socks if s.state == S.SYN_RECV]
    assert len(half) == HALF_OPEN and all(s.lport == zoo.half_port and s.raddr == A_ADDR and s.inode == 0
                                          for s in half)


@pytest.mark.parametrize("states,info", [(sock_diag.POLL_STATES, True), (sock_diag.ALL_STATES, False),
                                         (1 << S.LISTEN, True)])
def test_same_records_for_a_state_subset_and_without_tcp_info(zoo, states, info):
    socks = _compare(zoo.a, states, info)
    assert socks and all(states >> s.state & 1 for s in socks)
    if not info:
        assert all(s.health is None and s.rto_ms is None for s in socks)
        assert any(s.cgroup_id is not None for s in socks)   # (the kernel gives it unasked)


def test_each_namespace_dumps_its_own(zoo):
    a, b = sock_diag.dump(zoo.a), sock_diag.dump(zoo.b)
    assert {s.netns for s in a} == {zoo.a.inode} and {s.netns for s in b} == {zoo.b.inode}
    assert not {s.lport for s in a if s.state == S.LISTEN} & {s.lport for s in b if s.state == S.LISTEN}
    assert [s.lport for s in b if s.state == S.LISTEN] == [zoo.half_port]
