"""Incident scenarios from docs/tcp-troubleshooting.md, reproduced for real in two network
namespaces (tests/netpair.py), diagnosed by `doctor.run` with the real tracer and sock_diag.

Each test asserts the finding, its owner PID and endpoints, and that nothing else in the
test's namespaces is reported. Thresholds are lowered so that each scenario takes seconds.
Piles older than the doctor are judged by short looks (`--duration 0`: one snapshot) as
well as long ones, and their ages are checked against the time the test made them.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from netpair import A_ADDR, B_ADDR, GHOST, NetPair
from tcplife_trace.analysis.leaks import Thresholds
from tcplife_trace.diagnosis import Watch
from tcplife_trace.probes import socket_age
from tcplife_trace.probes.filters import Filters

from tcplife_trace import doctor

pytestmark = pytest.mark.privileged

FAST = dict(close_wait_age_s=1.0, fin_wait1_age_s=1.0, fin_wait2_age_s=1.0, last_ack_age_s=1.0,
            syn_sent_age_s=0.5)


@pytest.fixture
def pair(request):
    with NetPair(str(abs(hash(request.node.name)) % 10000)) as p:
        yield p


def diagnose(pair, on_ready=None, duration=2.5, filters=None, **thresholds):
    report = doctor.run(duration_s=duration, interval_s=1.0, thresholds=Thresholds(**{**FAST, **thresholds}),
                        on_ready=on_ready, filters=filters)
    ours = {pair.inode(pair.a), pair.inode(pair.b)}
    return [f for f in report["findings"] if f.netns in ours], report


def looked_at(report) -> float:
    """When the snapshot the report's findings judge was taken (wall clock, seconds)."""
    from datetime import datetime
    return datetime.fromisoformat(report["last_look_at"].replace("Z", "+00:00")).timestamp()


def only(findings, kind):
    got = [f for f in findings if f.kind == kind]
    assert len(got) == 1, [(f.kind, f.summary) for f in findings]
    return got[0]


def test_close_wait_leak_during_trace(pair):
    procs = {}

    def workload():
        procs["srv"] = pair.start(pair.b, "serve", "7001", "--no-close")
        procs["cli"] = pair.start(pair.a, "connect", B_ADDR, "7001", "3", "--then", "close")

    findings, _ = diagnose(pair, workload)
    f = only(findings, "close_wait_leak")
    assert f.owner_pid == procs["srv"].pid and f.owner_comm.startswith("python")
    assert f.count == 3 and f.local == f"{B_ADDR}:7001" and f.netns == pair.inode(pair.b)
    assert not f.age_lower_bound and f.oldest_age_s >= 1.0  # the trace saw CLOSE_WAIT begin
    assert f.evidence["eof_read"] == 3  # and the application read the EOF, then kept the socket
    assert len(f.evidence["fds"]) == 3
    # the rest of the picture: the client's orphaned sockets wait in FIN_WAIT2 for the server's
    # FIN, and the server's port is a listener that appeared during the trace
    assert {x.kind for x in findings} == {"close_wait_leak", "fin_wait2_stuck", "new_listener"}
    f2 = only(findings, "fin_wait2_stuck")
    assert f2.owner_pid == procs["cli"].pid and f2.evidence["orphaned"] == 3
    assert only(findings, "new_listener").owner_pid == procs["srv"].pid


@pytest.mark.parametrize("duration", [0, 2.5])
def test_close_wait_opened_before_the_trace(pair, duration):
    srv = pair.start(pair.b, "serve", "7002", "--no-close")
    cli = pair.start(pair.a, "connect", B_ADDR, "7002", "2", "--then", "close")
    assert cli.stdout.readline().strip() == "done"
    closed = time.time()
    time.sleep(3)
    findings, report = diagnose(pair, duration=duration)
    f = only(findings, "close_wait_leak")
    assert f.owner_pid == srv.pid and f.count == 2 and f.local == f"{B_ADDR}:7002"
    assert f.age_lower_bound  # born before the trace: its age is only known to be at least this
    # ... but from the kernel's clock (the last ACK received was the peer's FIN), not from when
    # the doctor first saw it: within a second of the truth however short the look
    truth = looked_at(report) - closed
    assert truth - 1.0 <= f.oldest_age_s <= truth
    assert f.evidence["age_source"] == socket_age.ACK_RECV
    assert report["sockets_at_start"]["CLOSE_WAIT"] >= 2
    assert (report["trace"] is None) == (duration == 0)  # a 0 s look attaches no tracer


def test_syn_sent_storm_to_blackholed_address(pair):
    pair.blackhole(pair.a, GHOST)
    procs = {}

    def workload():
        procs["cli"] = pair.start(pair.a, "connect-nb", GHOST, "80", "5")

    findings, _ = diagnose(pair, workload)
    f = only(findings, "syn_sent_storm")
    assert f.peer == f"{GHOST}:80" and f.owner_pid == procs["cli"].pid
    assert f.evidence["pending"] == 5 and f.count == 5
    assert "no answer" in f.summary


def test_refused_connects(pair):
    procs = {}

    def workload():
        p = pair.start(pair.a, "refused", B_ADDR, "7003", "6", ready=False)
        assert p.stdout.readline().strip() == "6"
        procs["cli"] = p

    findings, _ = diagnose(pair, workload)
    f = only(findings, "syn_sent_storm")
    assert f.peer == f"{B_ADDR}:7003" and f.owner_pid == procs["cli"].pid
    assert f.evidence["refused"] == 6 and f.rate_per_s > 0
    assert "nothing listens" in f.summary


def test_time_wait_churn_near_a_small_port_range(pair):
    pair.sysctl(pair.a, "net.ipv4.ip_local_port_range", "40000 40099")  # 100 ports, test netns only
    pair.start(pair.b, "serve", "7004")
    procs = {}

    def workload():
        procs["cli"] = pair.start(pair.a, "churn", B_ADDR, "7004", "80")

    findings, _ = diagnose(pair, workload)
    f = only(findings, "time_wait_churn")
    assert f.peer == f"{B_ADDR}:7004" and f.netns == pair.inode(pair.a)
    assert f.owner_pid == procs["cli"].pid
    assert f.evidence["time_wait_now"] == 80 and f.evidence["port_range"] == [40000, 40099]
    assert f.evidence["port_use_now"] == pytest.approx(0.8)
    # at this rate TIME_WAIT would need far more than 100 ports: exhaustion is imminent
    assert f.severity == "critical" and f.evidence["seconds_to_exhaustion"] is not None
    assert "tcp_tw_recycle no longer exists" in f.advice


def test_last_ack_when_the_peer_vanishes(pair):
    srv = pair.start(pair.b, "serve", "7005")
    cli = pair.start(pair.a, "connect", B_ADDR, "7005", "2", "--wait-stdin")

    def workload():
        pair.blackhole(pair.b, A_ADDR)  # the server's FIN never reaches the client
        pair.tell(cli)                  # client closes; server reads EOF, closes: LAST_ACK

    findings, _ = diagnose(pair, workload)
    f = only(findings, "last_ack_pile")
    assert f.netns == pair.inode(pair.b) and f.count == 2 and f.peer.startswith(A_ADDR)
    assert f.owner_pid == srv.pid  # closed: no fd left, the owner comes from the trace
    assert not f.age_lower_bound


def test_fin_wait2_with_a_peer_that_never_closes(pair):
    srv = pair.start(pair.b, "serve", "7006", "--no-close")
    cli = pair.start(pair.a, "connect", B_ADDR, "7006", "2", "--then", "shutdown", "--wait-stdin")

    def workload():
        pair.tell(cli)

    findings, _ = diagnose(pair, workload)
    f = only(findings, "fin_wait2_stuck")
    assert f.netns == pair.inode(pair.a) and f.owner_pid == cli.pid and f.count == 2
    assert f.peer == f"{B_ADDR}:7006"
    leak = only(findings, "close_wait_leak")  # the other side of the same story
    assert leak.owner_pid == srv.pid


def test_syn_flood_on_a_listener_with_a_tiny_backlog(pair):
    srv = pair.start(pair.b, "serve", "7007", "--backlog", "4", "--no-accept")
    for i in range(40):  # the spoofed sources resolve (to nobody): a SYN-ACK that cannot be sent drops its request
        pair.blackhole(pair.b, f"10.78.0.{100 + i}")

    def workload():
        pair.start(pair.a, "synflood", B_ADDR, "7007", "40")

    findings, _ = diagnose(pair, workload)
    f = only(findings, "syn_flood")
    assert f.local == "0.0.0.0:7007" and f.owner_pid == srv.pid and f.netns == pair.inode(pair.b)
    assert f.severity == "critical" and f.evidence["counters"].get("SyncookiesSent", 0) > 0
    assert f.evidence["pending_now"] >= 2 and f.evidence["distinct_sources"] >= 2
    # the tracer saw the listener re-send SYN-ACKs for the half-open requests (1 s, then backoff)
    assert f.evidence["synack_retransmits"] >= f.evidence["pending_now"]
    # the same flood judged for another process (-p): neither its SYN-ACK retransmits nor the
    # namespace's counters may make a finding for a listener that is not that process's
    other = pair.start(pair.b, "serve", "7017")
    findings, _ = diagnose(pair, lambda: pair.start(pair.a, "synflood", B_ADDR, "7007", "40"),
                           filters=Filters(pids=(other.pid,)))
    assert not [x for x in findings if x.kind in ("syn_flood", "listen_overflow")], findings
    # and for the flooded listener's owner, the counters say what they cover: both listeners
    findings, _ = diagnose(pair, lambda: pair.start(pair.a, "synflood", B_ADDR, "7007", "40"),
                           filters=Filters(pids=(srv.pid,)))
    f = only(findings, "syn_flood")
    assert f.owner_pid == srv.pid and "shared by its 2 listeners" in f.summary
    assert sorted(f.evidence["counters_cover"]) == ["0.0.0.0:7007", "0.0.0.0:7017"]


def test_healthy_workload_has_no_findings(pair):
    pair.start(pair.b, "serve", "7008")

    def workload():
        pair.start(pair.a, "connect", B_ADDR, "7008", "3", "--then", "hold")  # keep-alive
        pair.start(pair.a, "churn", B_ADDR, "7008", "30")                     # normal churn

    findings, report = diagnose(pair, workload, **{k: v for k, v in Thresholds().__dict__.items()})
    assert findings == []
    assert report["trace"]["connections_seen"] >= 33


@pytest.mark.parametrize("duration", ["0", "1.5"])
def test_doctor_cli_json_and_exit_status(pair, duration):
    srv = pair.start(pair.b, "serve", "7009", "--no-close")
    pair.start(pair.a, "connect", B_ADDR, "7009", "1", "--then", "close")
    time.sleep(1)
    # -L 7009: only this scenario's sockets, whatever else the host holds: one warning, nothing else
    cmd = [sys.executable, "-m", "tcplife_trace.cli", "doctor", "--duration", duration, "--json", "-L", "7009",
           "--threshold", "close_wait_age_s=0.5", "--threshold", "fin_wait2_age_s=0.5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # a warning, and --fail-on defaults to warning
    doc = json.loads(r.stdout)
    assert [(f["kind"], f["severity"], f["owner_pid"], f["local"], f["netns"]) for f in doc["findings"]] == [
        ("close_wait_leak", "warning", srv.pid, f"{B_ADDR}:7009", pair.inode(pair.b))]
    assert doc["findings"][0]["age_lower_bound"] and doc["findings"][0]["oldest_age_s"] >= 0.9
    assert doc["sockets_at_start"]["CLOSE_WAIT"] >= 1 and doc["filters"] == "lport 7009"
    if duration == "0":
        assert doc["trace"] is None
    else:
        assert doc["trace"]["connections_seen"] >= 0 and "events_lost" in doc["trace"]
    r = subprocess.run(cmd + ["--fail-on", "critical"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # the only finding is a warning
    bad = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "doctor", "--duration", "0", "-L", "99999"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "99999" in bad.stderr


def test_live_mode_prints_findings_as_they_appear(pair):
    import json
    import subprocess
    import sys
    srv = pair.start(pair.b, "serve", "7010", "--no-close")
    pair.start(pair.a, "connect", B_ADDR, "7010", "2", "--then", "close")
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "2.5", "--poll-interval", "1",
                        "--threshold", "close_wait_age_s=0.5", "-L", "7010", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    live = [ln for ln in r.stderr.splitlines() if ln.startswith("tcplife-trace: WARNING close_wait_leak")]
    assert len(live) == 1 and f"pid {srv.pid}" in live[0]  # announced once, while tracing
    summary = json.loads(r.stderr.splitlines()[-1])
    assert [(f["kind"], f["owner_pid"], f["count"]) for f in summary["findings"]] == [
        ("close_wait_leak", srv.pid, 2)]  # -L 7010: the client's FIN_WAIT2 side is filtered out
    assert summary["sockets_at_start"]["CLOSE_WAIT"] >= 2


def test_recording_holds_the_socket_snapshots(pair, tmp_path):
    """--record with --poll-interval: the sockets each look saw are in the file, so the
    recording finds a CLOSE_WAIT leak born before it, which its transitions never show."""
    import subprocess
    import sys
    from tcplife_trace import load
    srv = pair.start(pair.b, "serve", "7011", "--no-close")
    pair.start(pair.a, "connect", B_ADDR, "7011", "2", "--then", "close")
    path = tmp_path / "incident.arrow"
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "2.5", "--poll-interval", "1",
                        "--record", str(path), "-L", "7011"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"socket snapshots to {path}" in r.stderr and f"tcplife-trace analyze {path}" in r.stderr
    rec = load(str(path))
    assert rec.end["snapshots"] >= 3 and not rec.warnings  # the seed, the polls, the last look
    sn = rec.snapshots()
    ours = sn[(sn.netns == pair.inode(pair.b)) & (sn.lport == 7011)]
    last = ours[ours.time == sn.time.max()]
    assert set(last.state) == {"LISTEN", "CLOSE_WAIT"} and (last.owner_pid == srv.pid).all()
    assert sn[sn.time == sn.time.min()].complete.all()
    # the last look of a live trace takes ESTABLISHED too, and the recording says so
    from tcplife_trace.frames.leaks import snapshot_kind
    assert snapshot_kind(rec.snapshot_list[-1][1]) == "the periodic kind: no TIME_WAIT"
    assert not rec.transitions.lport.eq(7011).any()  # the trace itself saw nothing of them
    got = rec.leaks(Thresholds(**FAST))
    cw = got[(got.kind == "close_wait_leak") & (got.netns == pair.inode(pair.b))]
    assert len(cw) == 1 and cw.iloc[0]["count"] == 2 and cw.iloc[0].owner_pid == srv.pid


def test_ages_of_sockets_older_than_the_look(pair):
    """Sockets in every state the detectors judge, made ~20 s before one snapshot: each age is
    a lower bound from the kernel's clocks, within a second of the time the test made it."""
    born = {}
    v6 = socket.socket(socket.AF_INET6)  # IPv6 too, on loopback in our own namespace
    v6.bind(("::1", 0))
    v6.listen()
    v6c = socket.create_connection(("::1", v6.getsockname()[1]))
    v6s, _ = v6.accept()
    v6c.close()
    born["v6 CLOSE_WAIT"] = time.monotonic()
    wall = time.time() - time.monotonic()
    srv = pair.start(pair.b, "serve", "7101", "--no-close")
    c = pair.start(pair.a, "connect", B_ADDR, "7101", "2", "--then", "close")
    c.stdout.readline()
    born["CLOSE_WAIT"] = born["FIN_WAIT2 orphan"] = time.monotonic()
    c = pair.start(pair.a, "connect", B_ADDR, "7101", "1", "--then", "shutdown", "--wait-stdin")
    pair.tell(c)
    born["FIN_WAIT2"] = time.monotonic()
    pair.blackhole(pair.a, GHOST)
    pair.start(pair.a, "connect-nb", GHOST, "80", "2")
    born["SYN_SENT"] = time.monotonic()
    pair.start(pair.b, "serve", "7102")
    pair.start(pair.a, "churn", B_ADDR, "7102", "3")
    born["TIME_WAIT"] = time.monotonic()
    pair.start(pair.a, "connect", B_ADDR, "7102", "1", "--then", "hold")
    born["ESTABLISHED"] = time.monotonic()
    pair.start(pair.b, "serve", "7105", "--backlog", "4", "--no-accept")
    for i in range(3):  # the spoofed sources resolve (to nobody): a SYN-ACK that cannot be sent drops its request
        pair.blackhole(pair.b, f"10.78.0.{100 + i}")
    pair.start(pair.a, "synflood", B_ADDR, "7105", "3")
    born["SYN_RECV"] = time.monotonic()
    pair.start(pair.b, "serve", "7103")
    c = pair.start(pair.a, "connect", B_ADDR, "7103", "1", "--wait-stdin")
    pair.blackhole(pair.b, A_ADDR)  # from now on nothing b sends reaches a: no ACK of a's FIN, none of b's
    pair.tell(c)
    born["FIN_WAIT1"] = born["LAST_ACK"] = time.monotonic()
    time.sleep(max(0.0, born["v6 CLOSE_WAIT"] + 20 - time.monotonic()))

    w = Watch()
    snap = w.take_seed()
    df = w.sockets_frame(snap)
    now = snap.taken_ns / 1e9
    a, b = pair.inode(pair.a), pair.inode(pair.b)
    host = os.stat("/proc/self/ns/net").st_ino
    port = v6.getsockname()[1]
    where = {  # name -> (netns, state, local port, remote port, the clock that must have bounded it)
        "v6 CLOSE_WAIT": (host, "CLOSE_WAIT", port, None, socket_age.ACK_RECV),
        "CLOSE_WAIT": (b, "CLOSE_WAIT", 7101, None, socket_age.ACK_RECV),
        "FIN_WAIT2 orphan": (a, "FIN_WAIT2", None, 7101, socket_age.FIN_WAIT2_TIMER),
        "FIN_WAIT2": (a, "FIN_WAIT2", None, 7101, socket_age.ACK_RECV),
        "SYN_SENT": (a, "SYN_SENT", None, 80, socket_age.SYN_RETRANS),
        "TIME_WAIT": (a, "TIME_WAIT", None, 7102, socket_age.TIME_WAIT_TIMER),
        "ESTABLISHED": (a, "ESTABLISHED", None, 7102, socket_age.LAST_EVENT),
        "SYN_RECV": (b, "SYN_RECV", 7105, None, socket_age.REQ_TIMER),
        "FIN_WAIT1": (a, "FIN_WAIT1", None, 7103, socket_age.FIN_RETRANS),
        "LAST_ACK": (b, "LAST_ACK", 7103, None, socket_age.FIN_RETRANS),
    }
    for name, (ns, state, lport, rport, source) in where.items():
        rows = df[(df.netns == ns) & (df.state == state) & (df.age_source == source)]
        rows = rows[rows.lport == lport] if lport else rows[rows.rport == rport]
        assert len(rows), (name, df[(df.netns == ns) & (df.state == state)].to_dict("records"))
        truth = now - born[name]
        for r in rows.itertuples():
            assert r.age_lower_bound, name
            assert truth - 1.0 <= r.age_s <= truth + 0.05, (name, r.age_s, truth)
    # and the doctor's first look, 0 s long, finds the pile with its owner and that age
    report = doctor.run(duration_s=0, thresholds=Thresholds(**FAST), filters=Filters(lports=(7101,)))
    f = only(report["findings"], "close_wait_leak")
    truth = looked_at(report) - wall - born["CLOSE_WAIT"]
    assert f.owner_pid == srv.pid and f.count == 3 and truth - 1.0 <= f.oldest_age_s <= truth
    assert f.age_lower_bound and f"oldest >={f.oldest_age_s:.1f}s" in f.summary
    v6s.close()
    v6.close()


def test_live_finding_that_resolves_stays_in_the_summary(pair, tmp_path):
    """A CLOSE_WAIT leak announced while tracing, then closed by its server before the end:
    the exit summary and --report keep it, marked resolved and when."""
    import signal
    srv = pair.start(pair.b, "serve", "7012", "--close-on-stdin")
    pair.start(pair.a, "connect", B_ADDR, "7012", "2", "--then", "close")
    report = tmp_path / "report.json"
    p = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "--duration", "60", "--poll-interval", "1",
                          "--threshold", "close_wait_age_s=0.5", "-L", "7012", "--json", "--report", str(report)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            seen.append(line)
            if line.startswith("tcplife-trace: WARNING close_wait_leak"):
                break
        assert seen[-1].startswith("tcplife-trace: WARNING close_wait_leak") and f"pid {srv.pid}" in seen[-1], seen
        pair.tell(srv, "closed")  # the server closes them: the leak is over
        time.sleep(1.5)           # a periodic look after that
        p.send_signal(signal.SIGTERM)
        err = p.stderr.read()
        assert p.wait(timeout=30) == 0, err
    finally:
        p.kill()
    assert "findings: 1 (1 resolved before the end)" in err, err
    assert "WARNING close_wait_leak (resolved at " in err
    for doc in (json.loads(err.splitlines()[-1]), json.loads(report.read_text())):
        (f,) = doc["findings"]
        assert (f["kind"], f["owner_pid"], f["count"]) == ("close_wait_leak", srv.pid, 2)
        assert f["first_seen_at"] < f["resolved_at"]


def test_namespaces_that_cannot_be_read_are_reported(pair):
    """Without CAP_SYS_ADMIN, setns into the test's namespaces fails (EPERM): the doctor says
    which, instead of treating them as gone."""
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        sys.executable, "-m", "tcplife_trace.cli", "doctor", "--duration", "0", "--json"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode in (0, 1), r.stderr
    errors = json.loads(r.stdout)["snapshot_errors"]
    for ns in (pair.a, pair.b):
        assert any(f"network namespace {ns} " in e and "setns failed" in e and "CAP_SYS_ADMIN" in e
                   for e in errors), errors
    text = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           sys.executable, "-m", "tcplife_trace.cli", "doctor", "--duration", "0"],
                          capture_output=True, text=True, timeout=60, cwd="/").stdout
    assert f"NOT READ: network namespace {pair.a} " in text


def test_live_mode_judges_established_connections(pair):
    """The periodic looks skip ESTABLISHED, but not all of them: a plain live trace finds an
    idle connection with keepalive off (it never could: no look took ESTABLISHED)."""
    srv = pair.start(pair.b, "serve", "7013")
    pair.start(pair.a, "connect", B_ADDR, "7013", "1", "--then", "hold")
    time.sleep(2.5)  # no data either way since
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "2", "--poll-interval", "1",
                        "--threshold", "idle_established_s=2", "-L", "7013", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    found = [f for f in json.loads(r.stderr.splitlines()[-1])["findings"] if f["kind"] == "idle_established"]
    assert [(f["peer"], f["owner_pid"], f["count"]) for f in found] == [(A_ADDR, srv.pid, 1)], found
    assert any(ln.startswith("tcplife-trace: INFO idle_established") for ln in r.stderr.splitlines())
