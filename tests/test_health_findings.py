"""The findings on the ended connections' health (issue 15), on the real kernel with real
packets between two namespaces (tests/netpair.py; no netem: a peer's neighbour entry pointed
at a bogus MAC while data is in flight): a retransmit storm to one peer, connections that
died after retransmitting (TCP_USER_TIMEOUT), a peer whose handshakes stand far above the
rest (its SYNs dropped until the retry). Judged live (Session with the detectors: the
folded records as columns, the timed-out ones as Lifecycles through the tracker) and offline
on the recording of the same run; a second live session that gets every connection as a
Lifecycle tallies the same; a clean workload gives none of these findings."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from pyroute2 import NetNS

from netpair import A_ADDR, B_ADDR, NetPair
from tcplife_trace import load, recording
from tcplife_trace.analysis import evidence, leaks
from tcplife_trace.diagnosis import Watch, fold_handshake_ms
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import program as prog
from tcplife_trace.frames.leaks import evidence as recorded_evidence
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.session import Session

pytestmark = pytest.mark.privileged

PORT = 7311
FAST_A, FAST_B, SLOW = "10.78.0.4", "10.78.0.5", "10.78.0.6"  # more addresses of namespace b
KINDS = {"retransmit_storm", "retransmit_deaths", "slow_peer_handshake", "slow_peer_rtt"}
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def _ns(pair: NetPair, name: str) -> netns_mod.Netns:
    return netns_mod.Netns(pair.inode(name), f"/run/netns/{name}", name)


def _blackhole(pair: NetPair, addr: str, on: bool) -> None:
    if on:
        pair.blackhole(pair.a, addr)
        return
    with NetNS(pair.a) as ip:
        ip.neigh("del", dst=addr, ifindex=ip.link_lookup(ifname=f"{pair.a}0")[0])


class Peers:
    """Namespace b answers on B_ADDR, FAST_A, FAST_B and SLOW port PORT: a listener that reads
    every connection to its end, then closes it."""

    def __init__(self, pair: NetPair):
        self.pair = pair
        self.a, self.b = _ns(pair, pair.a), _ns(pair, pair.b)
        with NetNS(pair.b) as ip:
            idx = ip.link_lookup(ifname=f"{pair.b}0")[0]
            for addr in (FAST_A, FAST_B, SLOW):
                ip.addr("add", index=idx, address=addr, prefixlen=24)
        with netns_mod.entered(self.b):
            self.lsock = socket.create_server(("0.0.0.0", PORT), backlog=256)
        self.lsock.settimeout(0.2)
        self.stop = threading.Event()
        self.served: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                s, _ = self.lsock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = threading.Thread(target=self._drain, args=(s,), daemon=True)
            t.start()
            self.served.append(t)

    @staticmethod
    def _drain(s: socket.socket):
        s.settimeout(15)
        try:
            while s.recv(1 << 16):
                pass
        except OSError:
            pass
        s.close()

    def connect(self, addr: str, **opts) -> socket.socket:
        with netns_mod.entered(self.a):
            c = socket.socket()
        for opt, v in opts.items():
            c.setsockopt(socket.IPPROTO_TCP, {"user_timeout": TCP_USER_TIMEOUT}[opt], v)
        c.settimeout(10)
        c.connect((addr, PORT))
        return c

    def quick(self, addr: str, n: int) -> None:
        """n short connections: a request's worth of data, then closed."""
        for _ in range(n):
            c = self.connect(addr)
            c.sendall(b"q" * 2000)
            c.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.lsock.close()
        for t in self.served:
            t.join(15)


def _trouble(p: Peers) -> None:
    """Normal traffic to FAST_A and FAST_B; a storm to B_ADDR (4 connections re-sending after
    an outage) with 4 that die in it (TCP_USER_TIMEOUT 800 ms); 24 handshakes to SLOW whose
    first SYN is dropped (the retry, 1 s later, gets through)."""
    p.quick(FAST_A, 24)
    p.quick(FAST_B, 24)
    bulk = [p.connect(B_ADDR) for _ in range(4)]
    dying = [p.connect(B_ADDR, user_timeout=800) for _ in range(4)]
    for c in bulk + dying:
        c.sendall(b"p" * 50_000)
    time.sleep(0.3)  # acknowledged: RTT samples before the outage
    _blackhole(p.pair, B_ADDR, True)
    _blackhole(p.pair, SLOW, True)
    for c in bulk + dying:
        c.send(b"x" * 30_000, socket.MSG_DONTWAIT)  # in flight when nothing gets through
    slow = []
    for _ in range(24):
        with netns_mod.entered(p.a):
            s = socket.socket()
        s.setblocking(False)
        assert s.connect_ex((SLOW, PORT)) == 115  # EINPROGRESS: the SYN leaves, to a bogus MAC
        slow.append(s)
    time.sleep(0.4)
    _blackhole(p.pair, SLOW, False)  # the SYN retry (1 s after the first) finds the peer
    time.sleep(1.2)                  # the dying connections' user timeout passes in the outage
    _blackhole(p.pair, B_ADDR, False)
    for c in bulk:
        c.settimeout(15)
        c.sendall(b"y" * 50_000)     # (the backed-off retransmit carries on)
        c.close()
    for c in dying:
        with pytest.raises(OSError):
            c.sendall(b"z" * 1000)   # ETIMEDOUT: the kernel gave up
        c.close()
    deadline = time.monotonic() + 5
    for s in slow:
        s.setblocking(True)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        s.sendall(b"s" * 100)
        s.close()


def _clean(p: Peers) -> None:
    for addr in (FAST_A, FAST_B, SLOW, B_ADDR):
        p.quick(addr, 24)
    c = p.connect(B_ADDR)
    c.sendall(b"b" * 2_000_000)
    c.close()


def _run(pair: NetPair, workload, path: str):
    """The workload traced by a Session with the detectors, recording to path, and by a second
    session whose Watch gets every connection as a Lifecycle; returns (the Session's report,
    its Watch, the second Watch)."""
    p = Peers(pair)
    offset = time.time_ns() - time.monotonic_ns()
    w = RecordingWriter(path, recording.header("none", offset))
    other = Watch()
    lcs = None
    try:
        with Session(prog.Settings(), poll_interval_s=1.0, detectors=True, recorder=w,
                     wall_offset_ns=offset, final_full=True) as s:
            s.seed()
            lcs = LiveSession(on_close=other.closed)  # the folds as Lifecycles (Tracker.from_fold)
            done = threading.Event()
            failed = []

            def work():
                try:
                    workload(p)
                    p.close()
                except BaseException as e:  # noqa: BLE001 - said by the test below
                    failed.append(e)
                finally:
                    done.set()
            t = threading.Thread(target=work, daemon=True)
            t.start()
            deadline = time.monotonic() + 40
            while not done.is_set() and time.monotonic() < deadline:
                s.step(50)
                lcs.poll(10)
            t.join(1)
            assert done.is_set() and not failed, failed
            end = time.monotonic() + 1.0  # the last endings in, on both sides
            while time.monotonic() < end:
                s.step(50)
                lcs.poll(10)
            report = s.finish()
        w.close(report)
    finally:
        lost = lcs.stop()["events_lost"] if lcs is not None else None
        if not p.stop.is_set():
            p.close()
    report["other_events_lost"] = lost  # (whole-host tracing: a busy host may lose some)
    return report, s.watch, other


def _tally(frame, mine: set, by=("netns", "raddr", "owner_pid", "owner_comm")):
    """The tally's rows of the test's namespaces: key -> counts (or histogram buckets)."""
    h = frame[frame["netns"].isin(mine)]
    cols = list(evidence.TALLY_COUNTS) if "connections" in h else ["n"]
    keys = list(by) + ([] if "connections" in h else ["metric", "bucket"])
    return {k: tuple(int(x) for x in v) for k, v in h.groupby(keys)[cols].sum().iterrows()}


def _samples(times, mine: set, keys) -> dict:
    h = times[times["netns"].isin(mine)]
    return h.groupby(list(keys))["n"].sum().to_dict()


def test_retransmit_storm_deaths_and_a_slow_peer_live_and_offline(tmp_path):
    path = str(tmp_path / "trouble.arrow")
    with NetPair("hf") as pair:
        report, watch, other = _run(pair, _trouble, path)
        a, mine = pair.inode(pair.a), {pair.inode(pair.a), pair.inode(pair.b)}
    live = {f["kind"]: f for f in report["findings"] if f["kind"] in KINDS and f["netns"] == a}
    h_end, _ = watch.health_frames(time.monotonic_ns())
    assert set(live) >= {"retransmit_storm", "retransmit_deaths", "slow_peer_handshake"}, \
        (live, report["end_reasons"], report["events_lost"], h_end[h_end["netns"] == a].to_dict("records"))
    storm, deaths, slow = live["retransmit_storm"], live["retransmit_deaths"], live["slow_peer_handshake"]
    assert storm["peer"] == B_ADDR and storm["evidence"]["retransmitting"] >= 4
    assert storm["evidence"]["share_resent"] >= 0.01 and storm["evidence"]["segments_resent"] > 0
    assert deaths["peer"] == B_ADDR and deaths["evidence"]["timed_out"] == 4
    assert slow["peer"] == SLOW and slow["evidence"]["median_ms"] >= 800 and slow["evidence"]["others_median_ms"] < 100
    assert slow["severity"] == "warning" and slow["count"] >= 24
    # the connections that timed out once established are no failed connects
    assert not [f for f in report["findings"] if f["kind"] == "syn_sent_storm" and f["netns"] == a]
    # nothing of the kind for the other peers of the test's namespaces
    assert {(k, f["peer"]) for k, f in live.items()} <= {("retransmit_storm", B_ADDR), ("retransmit_deaths", B_ADDR),
                                                         ("slow_peer_handshake", SLOW)}
    # the tallies behind them: the Session's (columns and Lifecycles), the Lifecycles-only
    # session's and the recording's hold the same numbers for every peer of the test
    rec = load(path)
    now = time.monotonic_ns()
    h_live, t_live = watch.health_frames(now)
    h_lcs, t_lcs = other.health_frames(now)
    ev = recorded_evidence(rec.lifecycles(), rec.transitions, snapshots=rec.snapshot_list)
    lost = (report["events_lost"], report["other_events_lost"])
    assert _tally(h_live, mine) == _tally(h_lcs, mine) == _tally(ev.ended_health, mine), lost
    assert _tally(t_live, mine) == _tally(ev.ended_times, mine)
    # (the second session is a program of its own, its clock read at its own moments: the
    # same samples per peer, in buckets a hair apart)
    keys = ("netns", "raddr", "owner_pid", "owner_comm", "metric")
    assert _samples(t_live, mine, keys) == _samples(t_lcs, mine, keys)
    peers = {k[1] for k in _tally(h_live, mine)}
    assert peers >= {B_ADDR, FAST_A, FAST_B, SLOW, A_ADDR}  # (A_ADDR: the accepted sides, in b)
    # offline: the findings of the recording of the same run, through the same rule
    lk = rec.leaks()
    got = lk[lk["kind"].isin(KINDS) & (lk["netns"] == a)]
    assert not ((lk["kind"] == "syn_sent_storm") & (lk["netns"] == a)).any()
    assert sorted(zip(got["kind"], got["peer"])) == sorted((k, f["peer"]) for k, f in live.items())
    for k, f in live.items():
        r = got[got["kind"] == k].iloc[0]
        assert r["count"] == f["count"] and r["evidence"] == f["evidence"], k


def test_a_clean_workload_gives_none_of_them(tmp_path):
    path = str(tmp_path / "clean.arrow")
    with NetPair("hc") as pair:
        report, watch, _ = _run(pair, _clean, path)
        h, _ = watch.health_frames(time.monotonic_ns())
        mine = {pair.inode(pair.a), pair.inode(pair.b)}
        assert [f for f in report["findings"] if f["kind"] in KINDS and f["netns"] in mine] == []
        lk = load(path).leaks()
        assert lk[lk["kind"].isin(KINDS) & lk["netns"].isin(mine)].empty
    per = _tally(h, mine, by=("netns", "raddr"))
    assert sum(v[0] for v in per.values()) >= 2 * (4 * 24 + 1)  # every connection, both sides, was judged
    assert all(v[list(evidence.TALLY_COUNTS).index("died")] == 0 for v in per.values())


def test_fold_handshakes_equal_the_rule_of_lifecycles():
    """diagnosis.fold_handshake_ms (LIFE records as columns) is rules.handshake_ns of the same
    folds as Lifecycles (Tracker.from_fold), on real connections of both roles."""
    from tcplife_trace.analysis.rules import ROLES, handshake_ns
    from tcplife_trace.probes.event_layout import PATH_MAX
    got = []
    s = LiveSession(on_close=got.append)
    try:
        lsock = socket.create_server(("127.0.0.1", 0))
        for _ in range(5):
            c = socket.create_connection(lsock.getsockname())
            x, _ = lsock.accept()
            c.close()
            x.close()
        port = lsock.getsockname()[1]
        lsock.close()
        mine = lambda: [lc for lc in got if port in (lc.lport, lc.rport)]  # noqa: E731
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(mine()) < 11:
            s.poll(50)
    finally:
        s.stop()
    lcs = mine()
    assert sorted(lc.role for lc in lcs).count("passive") == 5
    n = len(lcs)
    path = np.zeros((n, PATH_MAX), dtype=np.uint8)
    state_ns = np.zeros((n, 16), dtype=np.uint64)
    mask = np.zeros(n, dtype=np.int64)
    for i, lc in enumerate(lcs):
        path[i, :len(lc.path)] = lc.path[:PATH_MAX]
        for st, v in lc.state_ns.items():
            state_ns[i, st] = v
            mask[i] |= 1 << st
    role = np.array([ROLES.index(lc.role) for lc in lcs])
    ms = fold_handshake_ms(role, path, np.array([len(lc.path) for lc in lcs]), mask, state_ns)
    want = [handshake_ns(lc.role, lc.path, lc.state_ns) for lc in lcs]
    assert [None if np.isnan(v) else v for v in ms] == [None if w is None else w / 1e6 for w in want]
    assert sum(w is not None for w in want) == 10  # both sides of each connection; the listener none


def _tally_of(peers: dict) -> evidence.Evidence:
    """Evidence from per-peer lists of (end reason, established, retrans, total_retrans,
    data_segs_out, handshake_ms), through ending_values and PeerTally."""
    t = evidence.PeerTally()
    for peer, rows in peers.items():
        reason = np.array([r[0] for r in rows], dtype=object)
        col = lambda i: np.array([r[i] for r in rows])  # noqa: E731
        values = evidence.ending_values(
            established=col(1).astype(bool), timed_out=reason == "timeout", reset=reason == "reset_by_peer",
            aborted=reason == "local_abort", retrans=col(2), syn_retrans=np.zeros(len(rows), np.int64),
            losses=np.zeros(len(rows), np.int64), total_retrans=col(3), data_segs_out=col(4),
            rtt_ms=np.full(len(rows), np.nan), handshake_ms=col(5).astype(float))
        t.add([(1, peer, 10, "app")], np.zeros(len(rows), np.int64), *values)
    health, times = t.frames()
    return evidence.Evidence(evidence.empty_sockets(), evidence.empty_ended(), 10.0, ended_health=health, ended_times=times)


def test_thresholds_keep_jitter_and_normal_loss_quiet():
    ok = ("active_close", True, 0, 0, 100, 0.1)
    # a peer 50x slower than two others, but on 19 handshakes: too few to judge
    ev = _tally_of({"10.0.0.1": [ok] * 30, "10.0.0.2": [ok] * 30, "10.0.0.3": [(*ok[:5], 5.0)] * 19})
    assert leaks.find(ev) == []
    ev = _tally_of({"10.0.0.1": [ok] * 30, "10.0.0.2": [ok] * 30, "10.0.0.3": [(*ok[:5], 5.0)] * 20})
    assert leaks.find(ev) == []  # 20 of them, 50x, but only 4.9 ms above: slow_peer_excess_ms
    ev = _tally_of({"10.0.0.1": [ok] * 30, "10.0.0.2": [ok] * 30, "10.0.0.3": [(*ok[:5], 50.0)] * 20})
    (f,) = leaks.find(ev)
    assert (f.kind, f.peer, f.severity) == ("slow_peer_handshake", "10.0.0.3", "warning")
    assert f.evidence["median_ms"] == pytest.approx(50, rel=0.05) and f.evidence["peers_compared"] == 3
    ev = _tally_of({"10.0.0.1": [ok] * 30, "10.0.0.3": [(*ok[:5], 50.0)] * 20})
    assert leaks.find(ev) == []  # one other peer is no "rest" to stand above (slow_peer_others)
    # retransmits: 5 connections re-sending 0.5% of what they sent is a lossy path's normal
    lossy = ("active_close", True, 1, 1, 200, 0.1)
    assert leaks.find(_tally_of({"10.0.0.4": [lossy] * 5})) == []
    (f,) = leaks.find(_tally_of({"10.0.0.4": [("active_close", True, 3, 4, 200, 0.1)] * 3}))
    assert (f.kind, f.severity, f.count, f.evidence["share_resent"]) == ("retransmit_storm", "warning", 3, 0.02)
    # deaths: a reset after no retransmit is no death; a timeout of an established one is
    quiet = [("reset_by_peer", True, 0, 0, 10, 0.1)] * 5 + [("timeout", False, 0, 0, 0, np.nan)] * 5
    assert leaks.find(_tally_of({"10.0.0.5": quiet})) == []
    died = [("reset_by_peer", True, 1, 1, 1000, 0.1), ("local_abort", True, 1, 1, 1000, 0.1),
            ("timeout", True, 0, 0, 1000, 0.1)]
    (f,) = leaks.find(_tally_of({"10.0.0.5": died}))
    assert f.kind == "retransmit_deaths" and f.evidence["timed_out"] == f.evidence["aborted"] == 1
    # the syn retries of a handshake are not data re-sent (total_retrans counts them)
    t = evidence.ending_values(established=np.array([True]), timed_out=np.array([False]), reset=np.array([False]),
                            aborted=np.array([False]), retrans=np.array([0]), syn_retrans=np.array([1]),
                            losses=np.array([0]), total_retrans=np.array([1]), data_segs_out=np.array([1]),
                            rtt_ms=np.array([np.nan]), handshake_ms=np.array([1000.0]))[0]
    assert t[0][list(evidence.TALLY_COUNTS).index("resent")] == 0


def test_a_tally_with_a_cap_counts_what_it_leaves_out():
    t = evidence.PeerTally(max_keys=2)
    for peer, n in (("10.0.0.1", 3), ("10.0.0.2", 2), ("10.0.0.3", 4), ("10.0.0.1", 1)):
        one = evidence.ending_values(
            established=np.ones(n, bool), timed_out=np.zeros(n, bool), reset=np.zeros(n, bool),
            aborted=np.zeros(n, bool), retrans=np.zeros(n, np.int64), syn_retrans=np.zeros(n, np.int64),
            losses=np.zeros(n, np.int64), total_retrans=np.zeros(n, np.int64), data_segs_out=np.full(n, 10),
            rtt_ms=np.full(n, np.nan), handshake_ms=np.ones(n))
        t.add([(1, peer, 10, "app")], np.zeros(n, np.int64), *one)
    health, _ = t.frames()
    assert dict(zip(health["raddr"], health["connections"])) == {"10.0.0.1": 4, "10.0.0.2": 2}
    assert t.untallied == 4  # the third peer's, which found no room
