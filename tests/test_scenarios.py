"""Incident scenarios from docs/tcp-troubleshooting.md, reproduced for real in two network
namespaces (tests/netpair.py), diagnosed by `doctor.run` with the real tracer and sock_diag.

Each test asserts the finding, its owner PID and endpoints, and that nothing else in the
test's namespaces is reported. Thresholds are lowered so that each scenario takes seconds.
"""
import pytest
from netpair import A_ADDR, B_ADDR, GHOST, NetPair
from tcplife_trace.analysis.leaks import Thresholds

from tcplife_trace import doctor

pytestmark = pytest.mark.privileged

FAST = dict(close_wait_age_s=1.0, fin_wait1_age_s=1.0, fin_wait2_age_s=1.0, last_ack_age_s=1.0,
            syn_sent_age_s=0.5)


@pytest.fixture
def pair(request):
    with NetPair(str(abs(hash(request.node.name)) % 10000)) as p:
        yield p


def diagnose(pair, on_ready=None, duration=2.5, **thresholds):
    report = doctor.run(duration_s=duration, interval_s=1.0, thresholds=Thresholds(**{**FAST, **thresholds}),
                        on_ready=on_ready)
    ours = {pair.inode(pair.a), pair.inode(pair.b)}
    return [f for f in report["findings"] if f.netns in ours], report


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


def test_close_wait_opened_before_the_trace(pair):
    srv = pair.start(pair.b, "serve", "7002", "--no-close")
    pair.start(pair.a, "connect", B_ADDR, "7002", "2", "--then", "close")
    findings, report = diagnose(pair)
    f = only(findings, "close_wait_leak")
    assert f.owner_pid == srv.pid and f.count == 2 and f.local == f"{B_ADDR}:7002"
    assert f.age_lower_bound  # born before the trace: its age is only known to be at least this
    assert report["sockets_at_start"]["CLOSE_WAIT"] >= 2


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
    assert f.owner_pid is None or f.owner_pid == srv.pid  # closed: no fd left, owner from the trace
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

    def workload():
        pair.start(pair.a, "synflood", B_ADDR, "7007", "40")

    findings, _ = diagnose(pair, workload)
    f = only(findings, "syn_flood")
    assert f.local == "0.0.0.0:7007" and f.owner_pid == srv.pid and f.netns == pair.inode(pair.b)
    assert f.severity == "critical" and f.evidence["counters"].get("SyncookiesSent", 0) > 0
    assert f.evidence["pending_now"] >= 2 and f.evidence["distinct_sources"] >= 2
    # the tracer saw the listener re-send SYN-ACKs for the half-open requests (1 s, then backoff)
    assert f.evidence["synack_retransmits"] >= f.evidence["pending_now"]


def test_healthy_workload_has_no_findings(pair):
    pair.start(pair.b, "serve", "7008")

    def workload():
        pair.start(pair.a, "connect", B_ADDR, "7008", "3", "--then", "hold")  # keep-alive
        pair.start(pair.a, "churn", B_ADDR, "7008", "30")                     # normal churn

    findings, report = diagnose(pair, workload, **{k: v for k, v in Thresholds().__dict__.items()})
    assert findings == []
    assert report["trace"]["connections_seen"] >= 33


def test_doctor_cli_json_and_exit_status(pair):
    import json
    import subprocess
    import sys
    srv = pair.start(pair.b, "serve", "7009", "--no-close")
    pair.start(pair.a, "connect", B_ADDR, "7009", "1", "--then", "close")
    cmd = [sys.executable, "-m", "tcplife_trace.cli", "doctor", "--duration", "1.5", "--json",
           "--threshold", "close_wait_age_s=0.5", "--threshold", "fin_wait2_age_s=0.5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # a warning, and --fail-on defaults to warning
    doc = json.loads(r.stdout)
    mine = [f for f in doc["findings"] if f["netns"] == pair.inode(pair.b)]
    assert [(f["kind"], f["owner_pid"], f["local"]) for f in mine] == [
        ("close_wait_leak", srv.pid, f"{B_ADDR}:7009")]
    assert doc["sockets_at_start"]["CLOSE_WAIT"] >= 1 and doc["trace"]["events_lost"] == 0
    r = subprocess.run(cmd + ["--fail-on", "critical"], capture_output=True, text=True, timeout=60)
    assert r.returncode == (1 if any(f["severity"] == "critical" for f in json.loads(r.stdout)["findings"])
                            else 0)


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
    assert not rec.transitions.lport.eq(7011).any()  # the trace itself saw nothing of them
    got = rec.leaks(Thresholds(**FAST))
    cw = got[(got.kind == "close_wait_leak") & (got.netns == pair.inode(pair.b))]
    assert len(cw) == 1 and cw.iloc[0]["count"] == 2 and cw.iloc[0].owner_pid == srv.pid
