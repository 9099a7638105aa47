"""How each connection ended, against what the application itself saw.

Real processes in two test network namespaces (tests/netpair.py): a server, and clients over
IPv4 and IPv6 that wait each way an application waits (blocking calls, poll(), select(), the
SO_SNDTIMEO/SO_RCVTIMEO socket options; tests/end_reason_apps.py) through every way a
connection ends: refused, the kernel's connect timeout (a blackholed neighbour, one SYN
retry in the client's namespace only), the application giving up on a connect, reset by the
peer (ECONNRESET, and EPIPE after the peer's FIN), a local abort (SO_LINGER 0) and normal
closes from either side. Each connection's end_reason and errno must be what the
application saw, in the stream, in the kernel's folds and offline from a recording; how a
connection ended must not depend on how its application waited or on the family.
"""
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from netpair import A_ADDR, B_ADDR, GHOST, BOGUS_MAC, NetPair

from tcplife_trace import load, recording
from tcplife_trace.analysis.end_rules import CONNECT_ABANDONED
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import program as prog
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.render.views import errno_name

pytestmark = pytest.mark.privileged

APPS = os.path.join(os.path.dirname(__file__), "end_reason_apps.py")
A6, B6, GHOST6 = "fd78::1", "fd78::2", "fd78::3"
WAITS = ("block", "poll", "select", "sockopt")
CLOSED_PORT = 9
# what the application saw -> how the connection ended (end_reason, errno)
ENDS = {"ECONNREFUSED": ("refused", "ECONNREFUSED"), "ETIMEDOUT": ("timeout", "ETIMEDOUT"),
        "gave_up": ("timeout", None), "ECONNRESET": ("reset_by_peer", "ECONNRESET"),
        "EPIPE": ("reset_by_peer", "EPIPE"), "aborted": ("local_abort", None),
        "closed_first": ("active_close", None), "eof": ("passive_close", None)}
# each client case, and what its application must see (the matrix covers what it says)
SAW = {"refused": "ECONNREFUSED", "connect_timeout": "ETIMEDOUT", "gave_up": "gave_up",
       "peer_reset": "ECONNRESET", "epipe": "EPIPE", "local_abort": "aborted",
       "active_close": "closed_first", "passive_close": "eof"}


def add_ipv6(pair: NetPair) -> None:
    for ns, addr in ((pair.a, A6), (pair.b, B6)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", f"{ns}0", "nodad"], check=True)
    subprocess.run(["ip", "-n", pair.a, "-6", "neigh", "replace", GHOST6, "lladdr", BOGUS_MAC, "dev",
                    f"{pair.a}0", "nud", "permanent"], check=True)


def run_matrix(session: LiveSession, pair: NetPair) -> list[dict]:
    """Run the server and the 8 clients; returns every application's report."""
    srv = subprocess.Popen(["ip", "netns", "exec", pair.b, sys.executable, APPS, "server", B_ADDR, B6],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(srv.stdout.readline()) == {"ready": True}
        clients = [subprocess.Popen(["ip", "netns", "exec", pair.a, sys.executable, APPS, "client", str(fam), wait,
                                     B_ADDR if fam == 4 else B6, str(CLOSED_PORT), GHOST if fam == 4 else GHOST6],
                                    stdout=subprocess.PIPE, text=True)
                   for fam in (4, 6) for wait in WAITS]
        deadline = time.monotonic() + 40
        while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
            session.poll(50)
        reports = [json.loads(line) for c in clients for line in c.communicate(timeout=5)[0].splitlines()]
        srv.stdin.write("stop\n")
        srv.stdin.flush()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            session.poll(50)
        reports += [json.loads(line) for line in srv.communicate(timeout=10)[0].splitlines()]
    finally:
        if srv.poll() is None:
            srv.kill()
    session.tracker.advance(time.monotonic_ns() + session.tracker.hold_ns)
    return reports


def expected(reports: list[dict], pair: NetPair) -> dict:
    """(netns, lport, rport) -> (end_reason, errno) from what each application saw."""
    a, b = pair.inode(pair.a), pair.inode(pair.b)
    out = {}
    for r in reports:
        if r["side"] == "client":
            assert r["saw"] == SAW[r["case"]], r
            out[(a, r["lport"], r["rport"])] = ENDS[r["saw"]]
        else:
            out[(b, r["lport"], r["rport"])] = ENDS[r["saw"]]
    return out


def assert_ends(got: dict, want: dict, path: str) -> None:
    missing = set(want) - set(got)
    spaces = {k[0] for k in want}
    assert not missing, (f"{path}: {len(missing)} connections missing, e.g. {sorted(missing)[:3]}; seen in the "
                         f"test namespaces: {sorted(k for k in got if k[0] in spaces)[:5]}")
    wrong = {k: (got[k], v) for k, v in want.items() if got[k][:2] != v}
    assert not wrong, f"{path}: {len(wrong)} of {len(want)} connections ended otherwise (got, want): {wrong}"


def ends_of(lifecycles) -> dict:
    return {(lc.netns, lc.lport, lc.rport): (lc.end_reason, errno_name(lc.errno), lc.end_detail) for lc in lifecycles}


def traced_matrix(mode: str):
    """The matrix under a tracer, repeated (at most 3 runs) until one loses no event: a
    tracepoint hit that finds any BPF program of the host running on its CPU is skipped (the
    kernel's recursion guard), and other tracers on a busy host make that happen."""
    losses = []
    for _ in range(3):
        with NetPair("end") as pair:
            add_ipv6(pair)
            pair.blackhole(pair.a, GHOST)
            pair.sysctl(pair.a, "net.ipv4.tcp_syn_retries", "1")  # SYN retries exhausted after 3 s
            closed = []
            s = LiveSession(prog.Settings(mode=mode), on_close=closed.append, keep_events=mode == "both")
            try:
                reports = run_matrix(s, pair)
            finally:
                report = s.stop()
            want = expected(reports, pair)
            a = pair.inode(pair.a)
        if not report["events_lost"]:
            return s, closed, reports, want, a
        losses.append({k: v for k, v in report["events_lost_by_kind"].items() if v})
    pytest.fail(f"every run lost events: {losses}")


@pytest.mark.parametrize("mode", ["both", "aggregate"])
def test_end_reasons_are_what_the_application_saw(tmp_path, mode):
    s, closed, reports, want, ns_a = traced_matrix(mode)
    n_clients = sum(r["side"] == "client" for r in reports)
    assert n_clients == 2 * (len(SAW) * len(WAITS) - 1) and len(want) == n_clients + 2 * 4 * 5
    got = ends_of(closed)
    assert_ends(got, want, "live " + ("stream" if mode == "both" else "aggregated"))
    # the application giving up is a connect timeout, and says so
    gave_up = [k for k, r in zip(want, reports) if r.get("case") == "gave_up"]
    assert gave_up and {got[k][2] for k in gave_up} == {CONNECT_ABANDONED}
    # the same end however the application waited and whatever the family
    by_case = defaultdict(set)
    for r in reports:
        if r["side"] == "client":
            by_case[r["case"]].add(got[(ns_a, r["lport"], r["rport"])][:2])
    assert all(len(v) == 1 for v in by_case.values()), dict(by_case)
    if mode != "both":
        return
    assert_ends(ends_of(s.agg_lifecycles), want, "live aggregated (mode both)")
    path = tmp_path / "matrix.arrow"
    w = RecordingWriter(str(path), recording.header("none", 0))
    w.add(s.kept)
    w.close()
    rec = load(str(path))
    frame = rec.lifecycles()
    offline = {(int(r.netns), int(r.lport), int(r.rport)): (r.end_reason, r.errno if isinstance(r.errno, str) else None,
                                                            r.end_detail)
               for r in frame.dropna(subset=["netns", "lport", "rport"]).itertuples()}
    assert_ends(offline, want, "offline")
    # the SYN_SENT storm detector counts every connect timeout, however it was reached
    found = rec.leaks()
    storms = {r.peer: r for r in found[found["kind"] == "syn_sent_storm"].itertuples()}
    for ghost in (GHOST, f"[{GHOST6}]"):
        f = storms[f"{ghost}:80"]
        evidence = f.evidence if isinstance(f.evidence, dict) else json.loads(f.evidence)
        assert evidence["timed_out"] == len(WAITS) + len(WAITS) - 1, evidence  # kernel's and the apps' own
