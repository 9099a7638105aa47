"""What the kernel's fold adds to each connection (issue 15), on the real kernel: the owner's
cgroup (bpf_get_current_cgroup_id() when the owner is attributed) for a workload run in a cgroup
and a network namespace the test creates; tcp_sock's health read at CLOSE through BTF offsets,
compared with `ss -ti` on the same socket just before it closed, for a connection made to
retransmit between two namespaces; retransmits and SYN retries counted from
tcp:tcp_retransmit_skb, loss episodes from tcp:tcp_cong_state_set; handshake times equal to
the state durations; a field this kernel's BTF lacks (or a missing tracepoint) is NA with a
notice, never 0."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from netpair import B_ADDR, GHOST, NetPair
from test_containers import ID, TOP, _workload_in, mount, space  # noqa: F401 - fixtures
from test_health import Retransmitted, _ss
from tracing import Traced
from tcplife_trace.render import views
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import btf, health, tracefs
from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.tcp_states import TcpState as S

pytestmark = pytest.mark.privileged


class Folds:
    """A stream session that follows the kernel's folds (on_close only: Tracker.from_fold)."""

    def __init__(self, settings=None):
        self.closed = []
        self.session = LiveSession(settings, on_close=self.closed.append)
        assert self.session.folds_only

    def wait(self, predicate, timeout=15.0):
        return Traced.wait_for(self, predicate, timeout)  # (the same poll loop, a longer default)

    def by_lport(self, port, netns=None):
        return [lc for lc in self.closed if lc.lport == port and (netns is None or lc.netns == netns)]

    def record(self, lc):
        return views.lifecycle_record(lc, self.session.clock)

    def stop(self):
        return self.session.stop()


def test_workload_in_a_cgroup_carries_it(mount, space):  # noqa: F811
    path = f"{TOP}/system.slice/docker-{ID}.scope"
    t = Folds()
    try:
        p = _workload_in(mount, path, space)
        want_id = os.stat(mount + path).st_ino
        p.stdin.write("go\n")  # it exits: its three connections (both ends) close in the cgroup
        p.stdin.flush()
        p.wait(10)
        ours = lambda: [lc for lc in t.closed if lc.netns == space.inode and lc.role != "listener"]  # noqa: E731
        assert t.wait(lambda: len(ours()) >= 6), [(lc.role, lc.lport, lc.netns) for lc in t.closed]
    finally:
        t.stop()
    conns = ours()
    assert len(conns) == 6 and sorted(lc.role for lc in conns) == ["active"] * 3 + ["passive"] * 3
    assert {lc.cgroup_id for lc in conns} == {want_id}
    for lc in conns:
        rec = t.record(lc)
        assert (rec["cgroup_id"], rec["cgroup"], rec["runtime"], rec["container_id"]) == \
            (want_id, path, "docker", ID), rec
    # the tracer's own connections (none here) aside, a connection of another cgroup has another id
    mine = open("/proc/self/cgroup").read().strip().split("::", 1)[1]
    assert os.stat(mount + mine).st_ino != want_id


def _abort(sock: socket.socket) -> None:
    """close() with SO_LINGER 0: a reset, and the CLOSE at once (no FIN exchange moves the counters)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_health_at_close_equals_ss_and_retransmits_are_counted():
    t = Folds()
    try:
        with NetPair("fh") as pair:
            conn = Retransmitted(pair)
            lport = conn.lport
            ss = _ss(pair.a, lport)
            _abort(conn.client)
            where = conn.a.inode
            assert t.wait(lambda: t.by_lport(lport, where))
            conn.server.close()
            conn.lsock.close()
    finally:
        t.stop()
    (lc,) = t.by_lport(lport, where)
    assert lc.role == "active" and lc.health_raw is not None
    h = health.from_fold(lc.health_raw)
    rtt, var = (float(x) for x in ss["rtt"].split("/"))
    assert h["rtt_ms"] == pytest.approx(rtt, abs=5e-4) and h["rttvar_ms"] == pytest.approx(var, abs=5e-4)
    assert h["min_rtt_ms"] == pytest.approx(float(ss["minrtt"]), abs=5e-4)
    assert h["total_retrans"] == int(ss["retrans"].split("/")[1]) > 0
    assert h["bytes_retrans"] == int(ss["bytes_retrans"]) > 0
    # (the CLOSE comes before the abort's reset: tcp_disconnect sets the state first)
    for ours, theirs in (("segs_in", "segs_in"), ("segs_out", "segs_out"), ("data_segs_out", "data_segs_out"),
                         ("delivered", "delivered"), ("snd_cwnd", "cwnd")):
        assert h[ours] == int(ss[theirs]), (ours, h, ss)
    assert h["lost"] == int(ss.get("lost", 0)) and h["reordering"] == int(ss.get("reordering", 3))
    assert h["delivery_rate"] * 8 == int(ss["delivery_rate"])
    # as they happened: every retransmitted skb (one or more segments each), no SYN retry,
    # and the retransmit timeout's loss episode
    assert 0 < lc.retrans <= h["total_retrans"] and lc.syn_retrans == 0
    assert lc.losses >= 1 and lc.recoveries is not None
    rec = t.record(lc)
    assert rec["rtt_ms"] == h["rtt_ms"] and rec["retransmits"] == lc.retrans and rec["losses"] == lc.losses
    # handshake: the time in SYN_SENT, left for ESTABLISHED
    assert lc.path[:3] == [S.CLOSE, S.SYN_SENT, S.ESTABLISHED]
    assert rec["handshake_ms"] == lc.state_ns[S.SYN_SENT] / 1e6 > 0
    # -w's lifecycle line carries the RTT and the retransmits
    view = views.TextView(t.session.clock, wide=True)
    header, line = view.lifecycle_header().split(), view.lifecycle(lc).split()
    at = header.index("RTT_MS")
    assert line[at:at + 2] == ["%.3f" % h["rtt_ms"], str(h["total_retrans"])]


def test_syn_retries_are_counted_apart():
    t = Folds()
    try:
        with NetPair("fs") as pair:
            ns = netns_mod.Netns(pair.inode(pair.a), f"/run/netns/{pair.a}", pair.a)
            pair.blackhole(pair.a, GHOST)  # the SYNs leave (an unresolved neighbour would hold them)
            with netns_mod.entered(ns):
                s = socket.socket()
            s.settimeout(1.6)  # the SYN, its retry after 1 s, then given up
            with pytest.raises(OSError):
                s.connect((GHOST, 9))
            lport = s.getsockname()[1]
            s.close()
            assert t.wait(lambda: t.by_lport(lport, ns.inode))
    finally:
        t.stop()
    (lc,) = t.by_lport(lport, ns.inode)
    assert lc.syn_retrans >= 1 and lc.retrans == 0
    rec = t.record(lc)
    assert rec["handshake_ms"] is None  # it never got to ESTABLISHED
    assert rec["rtt_ms"] is None        # no RTT sample: NA, not 0


def test_passive_handshake_is_the_syn_recv_time():
    t = Folds()
    try:
        lsock = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(lsock.getsockname())
        a, _ = lsock.accept()
        a.sendall(b"x")
        c.recv(1)
        lport, sport = c.getsockname()[1], lsock.getsockname()[1]
        c.close()
        a.close()
        lsock.close()
        pair = lambda: [x for x in t.closed if (x.lport, x.rport) in ((lport, sport), (sport, lport))]  # noqa: E731
        assert t.wait(lambda: len(pair()) == 2)
    finally:
        t.stop()
    for lc in pair():
        st = S.SYN_SENT if lc.role == "active" else S.SYN_RECV
        assert t.record(lc)["handshake_ms"] == lc.state_ns[st] / 1e6, lc.role
        assert lc.cgroup_id == os.stat(_my_cgroup_dir()).st_ino  # this process's own cgroup


def _my_cgroup_dir() -> str:
    from tcplife_trace import containers
    return containers.cgroup2_mount() + open("/proc/self/cgroup").read().strip().split("::", 1)[1]


def test_btf_without_a_field_and_kernel_without_the_tracepoints(monkeypatch):
    real_fields, real_probe = btf.health_fields, tracefs.probe

    def fields(*a, **kw):
        got, notes = real_fields(*a, **kw)
        got["srtt_us"] = None  # as a kernel whose struct tcp_sock has no srtt_us
        return got, notes + ["no member 'srtt_us' in struct tcp_sock: srtt_us at close will be NA"]

    def probe(root):
        present, notices = real_probe(root)
        for tp in (("tcp", "tcp_retransmit_skb"), ("tcp", "tcp_cong_state_set")):
            del present[tp]
            notices.append(f"tracepoint {'/'.join(tp)} is missing on this kernel: {tracefs.OPTIONAL[tp]}")
        return present, notices

    monkeypatch.setattr(btf, "health_fields", fields)
    monkeypatch.setattr(tracefs, "probe", probe)
    t = Folds()
    try:
        assert not any(tp in t.session.program.source.tracepoints
                       for tp in ("tcp:tcp_retransmit_skb", "tcp:tcp_cong_state_set"))
        assert any("tcp_retransmit_skb" in n for n in t.session.notices)
        assert any("srtt_us" in n for n in t.session.notices)
        lsock = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(lsock.getsockname())
        a, _ = lsock.accept()
        c.sendall(b"hello")
        a.recv(5)
        lport, sport = c.getsockname()[1], lsock.getsockname()[1]
        _abort(c)
        ours = lambda: [lc for lc in t.by_lport(lport) if lc.rport == sport]  # noqa: E731
        assert t.wait(ours)
        a.close()
        lsock.close()
    finally:
        t.stop()
    (lc,) = ours()
    h = health.from_fold(lc.health_raw)
    assert h["rtt_ms"] is None and h["rttvar_ms"] is not None  # the missing field alone is NA
    assert h["data_segs_out"] == 1 and h["min_rtt_ms"] is not None
    assert (lc.retrans, lc.syn_retrans, lc.recoveries, lc.losses) == (None, None, None, None)
    rec = t.record(lc)
    assert rec["retransmits"] is None and rec["rtt_ms"] is None


def test_health_defines_cover_the_fields_in_one_span():
    fields, _ = btf.health_fields()
    d = prog.health_defines(fields)
    base, span = d["TLT_HEALTH_BASE"], d["TLT_HEALTH_SPAN"]
    for name, m in fields.items():
        assert base <= m.offset and m.offset + m.size <= base + span, name
    assert span < 4096 and span % 8 == 0
    assert prog.health_defines(dict.fromkeys(fields)) == {}  # no field: nothing read at all


def test_lifecycles_built_from_events_take_the_extras_from_their_life_records():
    """A stream session's Tracker builds lifecycles from events; each batch's LIFE records give
    them what only the fold knows (take_fold_extras_batch, called once the batch's events are
    fed, before the held lifecycles are released): the same values the folds' own lifecycles
    have (mode "both" holds both)."""
    from tcplife_trace.analysis import lifecycle
    from tcplife_trace.analysis.lifecycle import FOLD_EXTRAS
    closed, transitions = [], []
    s = LiveSession(prog.Settings(mode="both"), on_close=closed.append, on_transition=transitions.append)
    assert not s.folds_only
    taken = []
    real = lifecycle.take_fold_extras_batch
    from tcplife_trace import live as live_mod
    # the session's own wiring (LiveSession._take_batch), counted on the way
    live_mod.take_fold_extras_batch = lambda lcs, lives: taken.append(real(lcs, lives)) or taken[-1]
    try:
        lsock = socket.create_server(("127.0.0.1", 0))
        sport = lsock.getsockname()[1]
        ports = []
        for _ in range(5):
            c = socket.create_connection(lsock.getsockname())
            a, _ = lsock.accept()
            c.sendall(b"hello")
            a.recv(5)
            ports.append(c.getsockname()[1])
            _abort(c)
            a.close()
        lsock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(lc.lport in ports and lc.rport == sport for lc in closed) < 5:
            s.poll(50)
    finally:
        s.stop()
        live_mod.take_fold_extras_batch = real
    mine = {lc.conn_id: lc for lc in closed if lc.lport in ports and lc.rport == sport}
    assert len(mine) == 5 and sum(taken) >= 5
    folded = {lc.conn_id: lc for lc in s.agg_lifecycles if lc.conn_id in mine}
    assert set(folded) == set(mine)
    for cid, lc in mine.items():
        assert lc.health_raw is not None and lc.cgroup_id is not None
        assert {f: getattr(lc, f) for f in FOLD_EXTRAS} == {f: getattr(folded[cid], f) for f in FOLD_EXTRAS}
