"""The detectors on small synthetic tables: thresholds, grouping, severities, advice.
(The same detectors on real kernels and namespaces: tests/test_scenarios.py.)"""
import pandas as pd
import pytest
from synthetic import ev
from tcplife_trace.analysis import leaks
from tcplife_trace.analysis.evidence import (ENDED_COLUMNS, Evidence, empty_ended, empty_sockets, scoped_counters,
                                            scoped_synack, sockets_frame, sockets_matching)
from tcplife_trace.analysis.leaks import Thresholds, find

from tcplife_trace.recording import Recording, header

NS = 4026531999


def sockets(*rows):
    """rows: (state, laddr, lport, raddr, rport, age_s[, pid[, extra dict]])"""
    out = []
    for r in rows:
        state, la, lp, ra, rp, age = r[:6]
        pid = r[6] if len(r) > 6 else None
        extra = r[7] if len(r) > 7 else {}
        row = dict(netns=NS, state=state, laddr=la, lport=lp, raddr=ra, rport=rp, inode=1, timer="off",
                   rqueue=0, wqueue=0, idle_recv_s=None, idle_sent_s=None, owner_pid=pid,
                   owner_comm=None if pid is None else f"p{pid}", owner_fd=None, age_s=age,
                   age_lower_bound=False, eof_age_s=None)
        row.update(extra)
        out.append(row)
    return sockets_frame(out)


def ended(*rows):
    """rows: (role, raddr, rport, end_reason, pid[, time_wait[, lport]])"""
    out = [dict(netns=NS, role=r[0], laddr="10.0.0.1", lport=r[6] if len(r) > 6 else 40000 + i,
                raddr=r[1], rport=r[2], owner_pid=r[4], owner_comm=f"p{r[4]}", end_reason=r[3],
                time_wait=r[5] if len(r) > 5 else False) for i, r in enumerate(rows)]
    return pd.DataFrame(out, columns=list(ENDED_COLUMNS))


def evidence(socks=None, ends=None, duration=10.0, **kw):
    return Evidence(socks if socks is not None else empty_sockets(),
                    ends if ends is not None else empty_ended(), duration, **kw)


LISTENER = ("LISTEN", "0.0.0.0", 8080, "0.0.0.0", 0, 100.0, 10)


def test_close_wait_grouped_by_owner_and_service_with_age_threshold():
    s = sockets(LISTENER,
                ("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.9", 50001, 12.0, 10, {"eof_age_s": 11.0}),
                ("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.8", 50002, 7.0, 10),
                ("CLOSE_WAIT", "10.0.0.1", 41000, "10.0.0.5", 5432, 30.0, 11),   # outgoing, to a DB
                ("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.7", 50003, 1.0, 10))    # too young
    got = [f for f in find(evidence(s)) if f.kind == "close_wait_leak"]
    assert [(f.owner_pid, f.local, f.peer, f.count) for f in got] == [
        (10, "10.0.0.1:8080", None, 2), (11, None, "10.0.0.5:5432", 1)]
    assert got[0].oldest_age_s == 12.0 and got[0].evidence["eof_read"] == 1
    assert "read the EOF on 1" in got[0].summary and got[0].severity == "warning"


def test_close_wait_pile_is_critical():
    rows = [("CLOSE_WAIT", "10.0.0.1", 41000 + i, "10.0.0.5", 5432, 60.0, 11) for i in range(100)]
    (f,) = [f for f in find(evidence(sockets(*rows))) if f.kind == "close_wait_leak"]
    assert f.severity == "critical" and f.count == 100 and len(f.samples) == 5


def test_close_piles_per_state_and_peer():
    s = sockets(*[("FIN_WAIT1", "10.0.0.1", 8080, "10.0.0.9", 50000 + i, 20.0, None, {"inode": 0})
                  for i in range(12)],
                ("LAST_ACK", "10.0.0.1", 8080, "10.0.0.3", 1234, 11.0),
                ("LAST_ACK", "10.0.0.1", 8080, "10.0.0.3", 1235, 2.0),           # too young
                ("FIN_WAIT2", "10.0.0.1", 41000, "10.0.0.4", 80, 40.0, 12))
    got = {f.kind: f for f in find(evidence(s))}
    assert got["fin_wait1_pile"].count == 12 and got["fin_wait1_pile"].severity == "warning"
    assert got["fin_wait1_pile"].evidence["orphaned"] == 12 and got["fin_wait1_pile"].peer == "10.0.0.9"
    assert got["last_ack_pile"].count == 1 and got["last_ack_pile"].peer == "10.0.0.3:1234"
    assert got["fin_wait2_stuck"].owner_pid == 12 and got["fin_wait2_stuck"].peer == "10.0.0.4:80"


def test_syn_sent_storm_needs_enough_failures_and_says_why():
    e = ended(*[("active", "10.0.0.5", 443, "refused", 20)] * 3, ("active", "10.0.0.6", 443, "refused", 20),
              ("active", "10.0.0.5", 443, "active_close", 20))
    s = sockets(("SYN_SENT", "10.0.0.1", 41000, "10.0.0.7", 80, 3.0, 21),
                ("SYN_SENT", "10.0.0.1", 41001, "10.0.0.7", 80, 3.0, 21),
                ("SYN_SENT", "10.0.0.1", 41002, "10.0.0.7", 80, 0.1, 21),       # just started
                ("SYN_SENT", "10.0.0.1", 41003, "10.0.0.7", 80, 2.0, 21))
    got = {f.peer: f for f in find(evidence(s, e)) if f.kind == "syn_sent_storm"}
    assert set(got) == {"10.0.0.5:443", "10.0.0.7:80"}
    assert got["10.0.0.5:443"].evidence["refused"] == 3 and got["10.0.0.5:443"].rate_per_s == 0.3
    assert "nothing listens" in got["10.0.0.5:443"].summary
    assert got["10.0.0.7:80"].evidence["pending"] == 3 and "no answer" in got["10.0.0.7:80"].summary
    assert got["10.0.0.7:80"].owner_pid == 21


def test_storm_peers_print_integer_ports_when_some_port_is_unknown():
    e = ended(*[("active", "10.0.0.5", 443, "refused", 20)] * 3, ("active", "10.0.0.6", None, "refused", 21))
    assert e["rport"].dtype == float  # one unknown port makes the column float
    got = [f for f in find(evidence(None, e)) if f.kind == "syn_sent_storm"]
    assert [f.peer for f in got] == ["10.0.0.5:443"] and "storm to 10.0.0.5:443:" in got[0].summary


def test_fan_out_to_many_destinations_is_one_critical_finding():
    e = ended(*[("active", f"10.1.{i // 250}.{i % 250}", 22, "timeout", 30) for i in range(60)])
    got = find(evidence(None, e))
    kinds = [f.kind for f in got]
    assert kinds == ["syn_sent_fanout"]
    assert got[0].severity == "critical" and got[0].evidence["distinct_destinations"] == 60
    assert got[0].owner_pid == 30


def test_syn_flood_per_listener_and_counters():
    lis = ("LISTEN", "0.0.0.0", 80, "0.0.0.0", 0, 100.0, 40, {"wqueue": 4})
    reqs = [("SYN_RECV", "10.0.0.1", 80, f"10.9.0.{i}", 3000 + i, 1.0, None, {"inode": 0}) for i in range(20)]
    (f,) = find(evidence(sockets(lis, *reqs)))
    assert (f.kind, f.severity, f.local, f.owner_pid) == ("syn_flood", "warning", "0.0.0.0:80", 40)
    assert f.evidence["distinct_sources"] == 20 and f.evidence["backlog"] == 4
    (f,) = find(evidence(sockets(lis, *reqs[:3]), counter_deltas={NS: {"SyncookiesSent": 75}}))
    assert f.kind == "syn_flood" and f.severity == "critical" and "SyncookiesSent +75" in f.summary
    (f,) = find(evidence(sockets(lis), counter_deltas={NS: {"ListenOverflows": 3, "ListenDrops": 3}}))
    assert f.kind == "listen_overflow" and f.count == 6


def test_time_wait_churn_port_range_use_and_exhaustion():
    ctl = {NS: {"ip_local_port_range": (40000, 40099), "tcp_tw_reuse": 2}}
    tw = [("TIME_WAIT", "10.0.0.1", 40000 + i, "10.0.0.2", 80, 5.0, None, {"inode": 0}) for i in range(60)]
    e = ended(*[("active", "10.0.0.2", 80, "active_close", 50, True)] * 60)
    (f,) = find(evidence(sockets(*tw), e, duration=60.0, sysctls=ctl))
    assert f.kind == "time_wait_churn" and f.owner_pid == 50
    assert f.evidence["port_use_now"] == pytest.approx(0.6) and f.evidence["port_use_steady"] == pytest.approx(0.6)
    assert f.severity == "warning" and f.evidence["seconds_to_exhaustion"] is None
    assert "tcp_tw_reuse" in f.advice and "now 2" in f.advice
    (f,) = find(evidence(sockets(*tw), e, duration=10.0, sysctls=ctl))  # 6/s: 360 needed, 100 ports
    assert f.severity == "critical" and f.evidence["seconds_to_exhaustion"] == pytest.approx(40 / 6, abs=0.1)


def test_time_wait_on_the_server_side_is_no_port_pressure():
    ctl = {NS: {"ip_local_port_range": (40000, 40099)}}
    lis = ("LISTEN", "0.0.0.0", 80, "0.0.0.0", 0, 100.0, 10)
    tw = [lis] + [("TIME_WAIT", "10.0.0.1", 80, "10.0.0.2", 50000 + i, 5.0, None, {"inode": 0})
                  for i in range(90)]
    e = ended(*[("passive", "10.0.0.2", 50000 + i, "active_close", 50, True, 80) for i in range(90)])
    assert find(evidence(sockets(*tw), e, duration=60.0, sysctls=ctl)) == []
    # ... until the rate itself is extreme
    (f,) = find(evidence(sockets(*tw), e, duration=0.1, sysctls=ctl))
    assert f.kind == "time_wait_churn" and f.local == "10.0.0.1:80" and f.rate_per_s == 900
    assert f.severity == "info" and not f.evidence["client_side"] and f.evidence["time_wait_now"] == 90


def test_idle_established_and_peer_piles():
    idle = {"idle_recv_s": 900.0, "idle_sent_s": 1000.0}
    s = sockets(LISTENER,
                ("ESTABLISHED", "10.0.0.1", 41000, "10.0.0.3", 6379, 0.0, 12, idle),
                ("ESTABLISHED", "10.0.0.1", 41001, "10.0.0.3", 6379, 0.0, 12, {**idle, "timer": "keepalive"}),
                *[("ESTABLISHED", "10.0.0.1", 8080, "10.0.0.4", 30000 + i, 0.0, 10) for i in range(200)])
    got = {f.kind: f for f in find(evidence(s))}
    assert got["idle_established"].count == 1 and got["idle_established"].peer == "10.0.0.3"
    assert got["peer_connection_pile"].count == 200 and got["peer_connection_pile"].peer == "10.0.0.4"


def test_healthy_tables_have_no_findings_and_frame_schema():
    s = sockets(LISTENER, *[("ESTABLISHED", "10.0.0.1", 8080, "10.0.0.4", 30000 + i, 0.0, 10) for i in range(5)],
                ("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.4", 31000, 0.01, 10),
                ("TIME_WAIT", "10.0.0.1", 41000, "10.0.0.4", 80, 3.0, None, {"inode": 0}))
    e = ended(("active", "10.0.0.4", 80, "active_close", 50, True), ("active", "10.0.0.4", 80, "refused", 50))
    assert find(evidence(s, e)) == []
    df = leaks.frame([])
    assert list(df.columns) == leaks.FRAME_COLUMNS and str(df.severity.dtype) == "category"


def test_thresholds_change_the_verdict():
    s = sockets(("CLOSE_WAIT", "10.0.0.1", 41000, "10.0.0.5", 5432, 3.0, 11))
    assert find(evidence(s)) == []
    assert [f.kind for f in find(evidence(s), Thresholds(close_wait_age_s=2))] == ["close_wait_leak"]


def _recording(rows):
    evs = [ev(*r[:-1], **r[-1]) if isinstance(r[-1], dict) else ev(*r) for r in rows]
    return Recording.from_events(evs, header("none", 0))


def test_leaks_from_a_recording():
    rec = _recording([
        (0, "S", 1, "CLOSE", "LISTEN", 10, 8080, 0),
        (10, "S", 2, "LISTEN", "SYN_RECV", 99, 8080, 50000),
        (11, "S", 2, "SYN_RECV", "ESTABLISHED", 99, 8080, 50000),
        (12, "IO", 2, 10),
        (20, "S", 2, "ESTABLISHED", "CLOSE_WAIT", 99, 8080, 50000),
        (21, "IO", 2, 10, "eof"),
        *[(100 + i, "S", 10 + i, "CLOSE", "SYN_SENT", 20, 0, 443, {"raddr": "10.0.0.5"}) for i in range(4)],
        *[(101 + i, "RR", 10 + i) for i in range(4)],
        *[(102 + i, "S", 10 + i, "SYN_SENT", "CLOSE", 0, 41000 + i, 443, {"raddr": "10.0.0.5"}) for i in range(4)],
        (9000, "S", 3, "CLOSE", "SYN_SENT", 30, 0, 80),
    ])
    lk = rec.leaks(Thresholds(close_wait_age_s=5))
    got = {r.kind: r for r in lk.itertuples()}
    assert set(got) == {"close_wait_leak", "syn_sent_storm", "new_listener"}
    cw = got["close_wait_leak"]
    assert cw.owner_pid == 10 and cw.local == "127.0.0.1:8080" and cw.oldest_age_s == pytest.approx(8.98)
    assert cw.evidence["eof_read"] == 1 and not cw.age_lower_bound
    assert got["syn_sent_storm"].evidence["refused"] == 4 and got["syn_sent_storm"].peer == "10.0.0.5:443"
    assert str(lk.severity.dtype) == "category" and lk.iloc[0].severity == "warning"


def test_counters_and_synack_obey_the_filters_and_say_what_they_cover():
    from tcplife_trace.probes.filters import Filters
    lis = [("LISTEN", "0.0.0.0", 80, "0.0.0.0", 0, 100.0, 40, {"wqueue": 4}),
           ("LISTEN", "0.0.0.0", 81, "0.0.0.0", 0, 100.0, 41, {"wqueue": 4})]
    reqs = [("SYN_RECV", "10.0.0.1", 80, f"10.9.0.{i}", 3000 + i, 1.0, 40, {"inode": 0}) for i in range(3)]
    everything = sockets(*lis, *reqs)
    deltas = {NS: {"SyncookiesSent": 7}}
    synack = {(NS, 80): (30, 20)}  # the SYN-ACKs re-sent were port 80's

    def judge(f, frame=everything):
        kept = sockets_matching(frame, f)
        d, scope = scoped_counters(deltas, frame, kept, f)
        assert scope == {NS: ["0.0.0.0:80", "0.0.0.0:81"]}
        return {x.kind: x for x in find(evidence(kept, counter_deltas=d, synack=scoped_synack(synack, kept, f),
                                                 counter_scope=scope))}

    for f in (None, Filters(pids=(40,)), Filters(lports=(80,))):
        got = judge(f)
        assert set(got) == {"syn_flood"} and got["syn_flood"].owner_pid == 40
        assert got["syn_flood"].severity == "critical"  # the namespace sent cookies while port 80 was flooded
        assert "shared by its 2 listeners: 0.0.0.0:80, 0.0.0.0:81" in got["syn_flood"].summary
        assert got["syn_flood"].evidence["counters_cover"] == ["0.0.0.0:80", "0.0.0.0:81"]
    # port 81's process shows no trouble of its own: neither port 80's SYN-ACKs nor the
    # namespace's counters make a finding for it
    assert judge(Filters(pids=(41,))) == {} and judge(Filters(lports=(81,))) == {}
    assert judge(Filters(rports=(443,))) == {}  # a listener has no remote port: nothing passes -D
    # ... unless its own queue is full now: then the counters may well be its own, said as shared
    full = sockets(lis[0], ("LISTEN", "0.0.0.0", 81, "0.0.0.0", 0, 100.0, 41, {"wqueue": 4, "rqueue": 4}))
    o = judge(Filters(pids=(41,)), full)["listen_overflow"]
    assert o.owner_pid == 41 and o.local == "0.0.0.0:81" and "shared by its 2 listeners" in o.summary
    alone = sockets(lis[0])
    d, scope = scoped_counters(deltas, alone, alone, None)
    (o,) = find(evidence(alone, counter_deltas=d, counter_scope=scope))
    assert o.kind == "listen_overflow" and o.owner_pid == 40 and "shared" not in o.summary  # the only listener


def test_ages_shown_without_the_lower_bound_mark_are_exact():
    """A pile whose oldest age is a lower bound says '>='; the storm's too (it said nothing)."""
    s = sockets(("CLOSE_WAIT", "10.0.0.1", 41000, "10.0.0.5", 5432, 30.0, 11,
                 {"age_lower_bound": True, "age_source": "tcp_info last_ack_recv"}),
                *[("SYN_SENT", "10.0.0.1", 42000 + i, "10.0.0.7", 80, 9.0, 21,
                   {"age_lower_bound": True, "age_source": "SYN retransmits"}) for i in range(3)])
    got = {f.kind: f for f in find(evidence(s))}
    cw, storm = got["close_wait_leak"], got["syn_sent_storm"]
    assert cw.age_lower_bound and "oldest >=30.0s" in cw.summary and cw.evidence["age_source"] == "tcp_info last_ack_recv"
    assert storm.age_lower_bound and storm.evidence["age_source"] == "SYN retransmits"


def test_the_playbook_names_every_detector_and_threshold():
    """docs/tcp-troubleshooting.md (the README cites it) puts each detector's rule and thresholds
    next to its playbook row: none may be missing, none invented."""
    import inspect
    import os
    import re
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "tcp-troubleshooting.md")).read()
    src = inspect.getsource(leaks)
    kinds = set(re.findall(r'Finding\(\s*"([a-z_0-9]+)"', src)) | {k for k, *_ in leaks._PILES.values()}
    assert kinds >= {"close_wait_leak", "syn_flood", "listen_overflow", "new_listener"}
    for kind in kinds:
        assert f"**`{kind}`**" in doc, kind
    for name in Thresholds.names():
        default = getattr(Thresholds(), name)
        assert re.search(rf"`{name}` \({default:g}( s)?\)", doc), (name, default)
    assert set(re.findall(r"\*\*`([a-z_0-9]+)`\*\*", doc)) == kinds


def _sock(state, **kw):
    from tcplife_trace.probes.sock_diag import Sock
    base = dict(netns=NS, family=4, state=int(state), laddr="10.0.0.1", lport=40000, raddr="10.0.0.2", rport=80,
                inode=1, uid=0, timer="off", expires_ms=0, retrans=0, rqueue=0, wqueue=0, idle_recv_ms=None,
                idle_sent_ms=None, ack_recv_ms=None, rto_ms=None)
    return Sock(**{**base, **kw})


def test_kernel_age_bounds_use_only_clocks_that_start_with_the_state():
    """probes/socket_age.py on the kernel's numbers: which clock bounds which state."""
    from tcplife_trace.probes import socket_age as sa
    from tcplife_trace.probes.tcp_states import TcpState as S
    j = sa.JIFFY_S
    # CLOSE_WAIT: data came 50 s ago, the FIN (with its ACK) 3 s ago: 3 s, never the 50
    assert sa.kernel_bound(_sock(S.CLOSE_WAIT, idle_recv_ms=50_000, idle_sent_ms=60_000, ack_recv_ms=3000)) == \
        (pytest.approx(3 - j), sa.ACK_RECV)
    # FIN_WAIT1: data was sent 1 s ago and is still unacknowledged with the FIN: nothing bounds it
    assert sa.kernel_bound(_sock(S.FIN_WAIT1, idle_sent_ms=1000, ack_recv_ms=9000, timer="on", retrans=3,
                                 wqueue=1201, rto_ms=1600.0, expires_ms=500)) == (None, None)
    # ... only the FIN outstanding, re-sent 3 times (RTO 0.2 doubling to 1.6 s, 0.5 s left):
    # 0.2 + 0.4 + 0.8 + (1.6 - 0.5) s since the series began
    b, src = sa.kernel_bound(_sock(S.LAST_ACK, timer="on", retrans=3, wqueue=1, rto_ms=1600.0, expires_ms=500))
    assert src == sa.FIN_RETRANS and b == pytest.approx(2.5 - j)
    # ... but not before a first RTO: the timer may be a tail-loss probe
    assert sa.kernel_bound(_sock(S.FIN_WAIT1, timer="on", retrans=0, wqueue=1, rto_ms=200.0,
                                 expires_ms=10)) == (None, None)
    # SYN_SENT with 4 linear retransmissions, then doubling: 8 retransmits, RTO 16 s, 15 s left = 20 s
    b, src = sa.kernel_bound(_sock(S.SYN_SENT, timer="on", retrans=8, rto_ms=16_000.0, expires_ms=15_000),
                             {"tcp_syn_linear_timeouts": 4})
    assert src == sa.SYN_RETRANS and b == pytest.approx(20 - j)
    # request socket: 4 expiries (1+2+4+8 s), armed for 16 s with 11 s left = 20 s
    b, src = sa.kernel_bound(_sock(S.SYN_RECV, inode=0, timer="on", retrans=4, expires_ms=11_000))
    assert src == sa.REQ_TIMER and b == pytest.approx(20 - j)
    # ESTABLISHED: the latest of three clocks that all start at the handshake
    assert sa.kernel_bound(_sock(S.ESTABLISHED, idle_recv_ms=7000, idle_sent_ms=9000, ack_recv_ms=7000))[0] == \
        pytest.approx(9 - j)
    # minisockets: TIME_WAIT's 60 s, an orphan's FIN_WAIT2 tcp_fin_timeout
    assert sa.kernel_bound(_sock(S.TIME_WAIT, inode=0, timer="timewait", expires_ms=45_000))[0] == \
        pytest.approx(15 - j)
    assert sa.kernel_bound(_sock(S.FIN_WAIT2, inode=0, timer="timewait", expires_ms=25_000),
                           {"tcp_fin_timeout": 30})[0] == pytest.approx(5 - j)
    assert sa.kernel_bound(_sock(S.LISTEN)) == (None, None)
    # the larger of the kernel's bound and the time seen, less how late the dump read the clocks
    assert sa.age(_sock(S.CLOSE_WAIT, ack_recv_ms=3000), None, 1.0, late_s=0.5) == \
        (pytest.approx(2.5 - j), sa.ACK_RECV)
    assert sa.age(_sock(S.CLOSE_WAIT, ack_recv_ms=3000), None, 4.0) == (4.0, sa.SEEN)


def test_a_group_whose_ages_are_all_unknown_has_no_oldest_and_no_traceback():
    """analyze --since can cut away every entry into the state of a still-open connection:
    its age is then unknown (NA), and the group's oldest age is unknown too (idxmax raised
    'Encountered all NA values' on pandas 3)."""
    s = sockets(("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.9", 50001, None, 10),
                ("CLOSE_WAIT", "10.0.0.1", 8080, "10.0.0.8", 50002, None, 10))
    age, lower, source = leaks._oldest(s)
    assert pd.isna(age) and lower and source is None
