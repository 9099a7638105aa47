"""The kernel's folded lifecycles (aggregated mode) equal the ones the Python state machine
builds from the full transition stream, for the same connections.

Mode "both" runs one program that sends every transition *and* folds each connection:
the same probe invocations, the same timestamps. The session feeds the transitions to
one Tracker and what the aggregated mode alone would send (LIFE records and the few
events it keeps) to another; every Lifecycle field must match, connection for connection.
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import pytest
from netpair import GHOST, NetPair
from tracing import Traced

from tcplife_trace import load, recording
from tcplife_trace.analysis.lifecycle import ENTRYLESS_BASE, ENTRYLESS_NOTE, FOLD_EXTRAS, Lifecycle
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import conn_map
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from tcplife_trace.probes.tcp_states import TcpState as S

pytestmark = pytest.mark.privileged

WORKLOAD = __file__.replace("test_kernel_aggregation.py", "agg_workload.py")
# every field of the lifecycle, not the stream's own bookkeeping (a cached text line, the
# sequence numbers and time it orders late events by): the fold has no stream to order
# (FOLD_EXTRAS: only the kernel's fold has them; tests/test_fold_home_health.py holds them to the kernel)
FIELDS = [f for f in Lifecycle.__slots__ if f not in ("view_cache", "seq", "first_seq", "first_ts", "early", *FOLD_EXTRAS)]
# one round of agg_workload.py, per end reason (23 connection ends)
ROUND = {"active_close": 9, "passive_close": 9, "local_abort": 2, "reset_by_peer": 2, "refused": 1}


def run_workload(session: LiveSession, rounds: int, workers: int) -> set[tuple[str, int]]:
    """Runs agg_workload.py under the session; returns the endpoints its connections have
    at one end (its listeners, the port its refused connects go to): see own()."""
    with tempfile.NamedTemporaryFile("r", prefix="agg_ports") as ports:
        p = subprocess.Popen([sys.executable, WORKLOAD, str(rounds), str(workers), ports.name],
                             stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            session.poll(50)
        out = p.communicate(timeout=5)[0].strip()
        assert out == "DONE", out
        endpoints = {(a, int(port)) for a, port in (line.split() for line in ports.read().splitlines())}
    assert len(endpoints) == 2 + 2 * workers
    for _ in range(4):  # the last endings' trailing events
        session.poll(30)
    session.tracker.advance(time.monotonic_ns() + session.tracker.hold_ns)
    return endpoints


def own(lcs, endpoints: set[tuple[str, int]]) -> list[Lifecycle]:
    """The workload's connections among lcs: those with one of its endpoints at one end.
    Other processes on the host make connections too, traced alike: the equivalence holds
    for every connection, the counts of a kind only for the workload's."""
    return [lc for lc in lcs if (lc.laddr, lc.lport) in endpoints or (lc.raddr, lc.rport) in endpoints]


def differences(a: Lifecycle, b: Lifecycle, skip=()) -> dict:
    out = {f: (getattr(a, f), getattr(b, f)) for f in FIELDS
           if f not in skip and getattr(a, f) != getattr(b, f)}
    if list(a.state_ns) != list(b.state_ns):  # the same order too: it is the order views print
        out["state_ns order"] = (list(a.state_ns), list(b.state_ns))
    return out


def assert_same(stream: list[Lifecycle], folded: list[Lifecycle]) -> None:
    by_id = {lc.conn_id: lc for lc in stream}
    folded_by_id = {lc.conn_id: lc for lc in folded}
    assert len(by_id) == len(stream) and len(folded_by_id) == len(folded)
    assert set(by_id) == set(folded_by_id)
    diffs = {k: d for k in by_id if (d := differences(by_id[k], folded_by_id[k]))}
    assert not diffs, f"{len(diffs)} of {len(by_id)} lifecycles differ, e.g. {next(iter(diffs.items()))}"


def spy_batches(s: LiveSession) -> list:
    """The Batches the session's stream hands out (its poll/drain/finish derive from them)."""
    got = []
    for name in ("poll_batch", "drain_batch"):
        real = getattr(s.stream, name)

        def spy(*args, _real=real):
            b = _real(*args)
            got.append(b)
            return b
        setattr(s.stream, name, spy)
    return got


def test_folded_lifecycles_equal_the_stream_ones():
    stream = []
    s = LiveSession(prog.Settings(mode="both"), on_close=stream.append)
    batches = spy_batches(s)
    try:
        endpoints = run_workload(s, rounds=8, workers=3)
    finally:
        report = s.stop()
    assert report["events_lost"] == 0
    assert_same(stream, s.agg_lifecycles)
    # the events' own fold: per connection, the times its transitions carry add up to its
    # state_ns, and its last event's owner is the lifecycle's (tests/test_kernel_fold_events.py
    # compares every event)
    import numpy as np
    from tcplife_trace.probes.event_layout import OWNER_SOURCE_NAMES, XFlag
    ev = np.concatenate([b.events for b in batches])
    st = ev[(ev["kind"] == 1) & ((ev["xflags"] & int(XFlag.DUR)) != 0)]
    sums = Counter()
    for gen, old, dur in zip(st["gen"].tolist(), st["oldstate"].tolist(), st["dur_ns"].tolist()):
        sums[(gen, old)] += dur
    last = {}
    folded = ev[(ev["xflags"] & int(XFlag.FOLDED)) != 0]
    for gen, src, pid in zip(folded["gen"].tolist(), folded["owner_src"].tolist(), folded["owner_pid"].tolist()):
        last[gen] = (OWNER_SOURCE_NAMES[src], pid)
    checked = 0
    for lc in stream:
        if lc.conn_id not in last or lc.role == "listener":
            continue
        assert {st_: ns for (g, st_), ns in sums.items() if g == lc.conn_id} == dict(lc.state_ns), lc.conn_id
        assert last[lc.conn_id] == (lc.owner_source, lc.owner_pid or 0), lc.conn_id
        checked += 1
    assert checked >= len(stream) // 2
    # the mix the comparison covered: the workload's connections (other processes' on this
    # host are traced too, and compared above alike, but how many and which is theirs)
    mine = own(stream, endpoints)
    ends = Counter(lc.end_reason for lc in mine if lc.role != "listener")
    assert ends == {k: v * 8 * 3 for k, v in ROUND.items()}, ends
    assert Counter(lc.role for lc in mine if lc.role == "listener") == {"listener": 2 * 3}
    assert {lc.owner_source for lc in mine} >= {"connect", "io", "close", "listen"}
    assert any(len(lc.pids) > 1 for lc in mine)           # the forked reader
    assert {lc.family for lc in mine} == {4, 6}
    assert any(lc.rst_sent for lc in mine) and any(lc.rst_received for lc in mine)
    assert any(lc.eof_ns for lc in mine) and any(lc.tx_b for lc in mine)
    assert sum(lc.time_wait for lc in mine) == ROUND["active_close"] * 8 * 3


def test_folded_lifecycles_equal_the_stream_ones_under_filters():
    """-L in the kernel: both views drop and keep the same connections."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    stream = []
    s = LiveSession(prog.Settings(Filters(lports=(port,)), mode="both"), on_close=stream.append)
    try:
        for listener in (ls, other, ls):
            c = socket.create_connection(listener.getsockname(), timeout=5)
            a, _ = listener.accept()
            c.close()
            a.recv(1)
            a.close()
        for _ in range(6):
            s.poll(30)
        s.tracker.advance(time.monotonic_ns() + s.tracker.hold_ns)
    finally:
        ls.close()
        other.close()
        s.stop()
    assert_same(stream, s.agg_lifecycles)
    assert sorted(lc.role for lc in stream) == ["listener", "passive", "passive"]


def test_connect_timeout_folds_like_the_stream(tmp_path):
    """SYN retries exhausted (a neighbour that never answers, 1 retry in the test netns)."""
    with NetPair("agg") as pair:
        pair.blackhole(pair.a, GHOST)
        pair.sysctl(pair.a, "net.ipv4.tcp_syn_retries", "1")
        stream = []
        s = LiveSession(prog.Settings(mode="both"), on_close=stream.append)
        try:
            code = ("import socket; s = socket.socket(); s.settimeout(20)\n"
                    f"try: s.connect(('{GHOST}', 80))\nexcept OSError as e: print(e.errno)")
            p = subprocess.Popen(["ip", "netns", "exec", pair.a, sys.executable, "-c", code],
                                 stdout=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while p.poll() is None and time.monotonic() < deadline:
                s.poll(50)
            assert p.communicate(timeout=5)[0].strip() == "110"  # ETIMEDOUT
            for _ in range(4):
                s.poll(30)
            s.tracker.advance(time.monotonic_ns() + s.tracker.hold_ns)
        finally:
            s.stop()
    mine = [lc for lc in stream if lc.raddr == GHOST]
    assert [(lc.role, lc.end_reason) for lc in mine] == [("active", "timeout")]
    assert mine[0].state_ns[S.SYN_SENT] > 2_000_000_000  # 1 s + 2 s of retries
    assert_same(stream, s.agg_lifecycles)


def test_open_connections_read_from_the_map_equal_the_stream_ones():
    """A connection still open is in the kernel map only: read out, it is the lifecycle
    the stream has so far (last_ns aside: the stream moves it on every read or write)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    s = LiveSession(prog.Settings(mode="both"))
    socks = []
    try:
        c1 = socket.create_connection(ls.getsockname(), timeout=5)   # stays ESTABLISHED
        a1, _ = ls.accept()
        c1.sendall(b"x")
        a1.recv(1)
        c2 = socket.create_connection(ls.getsockname(), timeout=5)   # server side in CLOSE_WAIT (the
        a2, _ = ls.accept()                                           # orphaned client's FIN_WAIT2 is
                                                                      # a minisocket: closed for us)
        c2.close()
        assert a2.recv(1) == b""
        socks = [c1, a1, a2]
        for _ in range(4):
            s.poll(30)
        port = ls.getsockname()[1]
        stream = {lc.conn_id: lc for lc in s.tracker.live.values()
                  if not lc.closed and port in (lc.lport, lc.rport) and lc.role != "listener"}
        folded = {lc.conn_id: lc for lc in map(s.agg_tracker.from_fold, conn_map.open_folds(s.program.bpf))
                  if port in (lc.lport, lc.rport)}
        # compared now: closing the sockets moves the stream's lifecycles on
        assert sorted(S(lc.state).name for lc in stream.values()) == ["CLOSE_WAIT", "ESTABLISHED", "ESTABLISHED"]
        assert set(stream) == set(folded)
        for k, lc in stream.items():
            assert differences(lc, folded[k], skip=("last_ns",)) == {}
    finally:
        for x in socks:
            x.close()
        ls.close()
        s.stop()


def test_aggregated_mode_sends_one_record_per_connection():
    t = Traced(prog.Settings(mode="aggregate"))
    rounds, workers = 5, 2
    try:
        endpoints = run_workload(t.session, rounds, workers)
    finally:
        report = t.stop()
    assert report["mode"] == "aggregate" and report["events_lost"] == 0
    check = report["startup_check_events"]  # the tracer's own check connection at start (not the workload's)
    sent = {k: n - check.get(k, 0) for k, n in report["events_emitted_by_kind"].items()}
    # (the kernel's counts are the host's: other processes' connections are in them too; the
    # workload's are told by their endpoints)
    mine = own(t.closed, endpoints)
    assert sent["life"] >= sum(lc.role != "listener" for lc in mine) == sum(ROUND.values()) * rounds * workers
    assert {t_.lc.role for t_ in t.transitions} == {"listener"}  # no connection's transitions came up
    assert sum(t_.lc in mine for t_ in t.transitions) == 2 * 2 * workers  # the listeners' births and closes
    ends = Counter(lc.end_reason for lc in mine if lc.role != "listener")
    assert ends == {k: v * rounds * workers for k, v in ROUND.items()}
    for lc in mine:
        if lc.role != "listener":
            assert lc.birth_seen and lc.duration_ns == sum(lc.state_ns.values())
            assert lc.owner_pid is not None and lc.laddr in ("127.0.0.1", "::1")


def test_every_connection_end_is_reported_when_its_namespace_goes_away():
    """The churn benchmark's workload: a fresh netns per run, deleted right after. Some
    clients are still in FIN_WAIT1 then, and the kernel frees them with neither a CLOSE
    nor tcp_destroy_sock; the next socket born at the same address reports them. Both
    views must agree, and every end of every connection must be there."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_churn", os.path.join(
        os.path.dirname(__file__), "..", "bench", "churn.py"))
    churn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(churn)
    stream = []
    s = LiveSession(prog.Settings(mode="both"), on_close=stream.append)
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(zip(("port", "rate", "made"),
                                                                   churn.churn_in_netns(4000, 1))))
        worker.start()
        while worker.is_alive():
            s.poll(50)
        worker.join()
        end = time.monotonic() + 3  # the last orphans' FINs, retransmitted
        while time.monotonic() < end:
            s.poll(50)
        s.tracker.advance(time.monotonic_ns() + s.tracker.hold_ns)
    finally:
        report = s.stop()
    # Under this churn the kernel skips some of our probe runs (a softirq that changes a
    # socket's state while a BPF program runs on that CPU: recursion misses, counted, see
    # test_losses.py). Nothing may be lost otherwise; a skipped run is skipped for both views
    # alike (mode both: one run sends the event and folds), so they must still agree.
    skipped = {k: v for k, v in report["events_lost_by_kind"].items() if k.startswith("recursion:") and v}
    assert report["events_lost"] == sum(skipped.values()), report["events_lost_by_kind"]
    mine = [lc for lc in stream if result["port"] in (lc.lport, lc.rport) and lc.role != "listener"]
    still = [lc for lc in s.still_open if result["port"] in (lc.lport, lc.rport) and lc.role != "listener"]
    missing = 2 * result["made"] - len(mine) - len(still)
    assert 0 <= missing <= skipped.get("recursion:sock:inet_sock_set_state", 0), (missing, skipped)
    for lc in mine:
        assert lc.end_reason in ("active_close", "passive_close") or lc.incomplete, \
            (lc.path, lc.end_reason, lc.incomplete)
        if not skipped:
            assert lc.end_reason in ("active_close", "passive_close") or \
                any("no CLOSE" in note for note in lc.incomplete), (lc.path, lc.end_reason, lc.incomplete)
    assert_same(stream, s.agg_lifecycles)


@pytest.mark.parametrize("mode", ["both", "aggregate"])
def test_connections_the_full_map_had_no_entry_for_still_end(tmp_path, mode):
    """--max-conns 1024 and 1500 connections held open at once (3001 sockets): those born
    while the map was full fall back to events, and many get an entry once others have closed.
    Every one must end at its CLOSE with its role, the same in the stream, in the kernel's
    folds (mode both: the same probe runs; and the aggregated mode alone) and offline from a
    recording of the same events."""
    n = 1500
    losses = []
    for _ in range(3):  # until a run loses no event (other BPF programs on a busy host make some miss)
        stream = []
        s = LiveSession(prog.Settings(max_conns=1024, mode=mode), on_close=stream.append,
                        keep_events=mode == "both")
        try:
            p = subprocess.Popen([sys.executable, WORKLOAD, "hold", str(n)], stdout=subprocess.PIPE, text=True)
            port = int(p.stdout.readline())
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline:
                s.poll(50)
            assert p.communicate(timeout=5)[0].strip() == "DONE"
            for _ in range(6):
                s.poll(30)
            s.tracker.advance(time.monotonic_ns() + s.tracker.hold_ns)
        finally:
            report = s.stop()
        if not report["events_lost"]:
            break
        losses.append({k: v for k, v in report["events_lost_by_kind"].items() if v})
    else:
        pytest.fail(f"every run lost events: {losses}")
    assert report["conn_map_full"] > 0
    mine = [lc for lc in stream if port in (lc.lport, lc.rport) and lc.role != "listener"]
    assert not [lc for lc in s.still_open if port in (lc.lport, lc.rport)]
    assert Counter(lc.role for lc in mine) == {"active": n, "passive": n}
    assert Counter((lc.role, lc.end_reason) for lc in mine) == {
        ("active", "active_close"): n // 2, ("passive", "passive_close"): n // 2,
        ("passive", "active_close"): n // 2, ("active", "passive_close"): n // 2}
    entryless = [lc for lc in mine if lc.conn_id >= ENTRYLESS_BASE]
    adopted = [lc for lc in mine if lc.conn_id < ENTRYLESS_BASE and ENTRYLESS_NOTE in lc.incomplete]
    assert len(entryless) > 100 and len(adopted) > 100, (len(entryless), len(adopted))
    for lc in mine:
        assert lc.birth_seen and lc.duration_ns == sum(lc.state_ns.values()), (lc.conn_id, lc.path)
    if mode == "aggregate":
        assert report["events_emitted_by_kind"]["life"] > 100  # the adopted ones: folded from mid-life on
        return
    assert_same(stream, s.agg_lifecycles)
    # offline, from a recording of the same events
    path = tmp_path / "full.arrow"
    w = RecordingWriter(str(path), recording.header("none", 0))
    w.add(s.kept)
    w.close()
    from test_offline_equivalence import compare
    frame = load(str(path)).lifecycles()
    frame = frame[(frame.lport == port) | (frame.rport == port)]
    compare(frame, {lc.conn_id: lc for lc in stream if port in (lc.lport, lc.rport)}, {})
