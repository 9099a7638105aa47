"""The per-transition views formatted a batch at a time from the columns (tcplife_trace/
render/batches.py) against the per-event views (views.TextView.transition, transition_record +
dumps, CsvRows), line for line, in order, on a real mixed workload traced by the real kernel:
one LiveSession that follows every event (keep_events=True) gives each Transition to the
reference views and each batch's columns to the column views, which read the kernel's fold.

Workload: pairs opened before the trace and closed during it (births unseen, owners from a
read or write), a connection accepted on a listener from before the trace (no owner known
at first), a pre-forked server whose worker accepts (the listener's owner first, then
the worker's) in IPv4 and IPv6, then tests/agg_workload.py (IPv4 and IPv6 listeners, client
and server closes, refused, aborts from either side, half-close, a forked reader, TIME_WAIT).
Then, with a kernel connection map too small for the connections held open at once
(agg_workload.py hold), the strays without a map entry, whose lines the tracker renders.
"""
import json
import re
import socket
import subprocess
import sys
import time

import pytest
from test_kernel_fold_events import finish_preexisting, prefork_once, preexisting_pairs

from tcplife_trace.analysis.lifecycle import ENTRYLESS_BASE, ENTRYLESS_NOTE
from tcplife_trace.render.batches import BatchFormatter, ColumnTransitions
from tcplife_trace.render.csv_rows import CsvRows
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import program as prog
from tcplife_trace.render.views import Clock, TextView, dumps, transition_record

HERE = __file__.rsplit("/", 1)[0]
WORKLOAD = f"{HERE}/agg_workload.py"
TEXT = {"plain": {}, "-T": {"hms": True}, "-w": {"wide": True}, "-t -T -w": {"seconds": True, "hms": True, "wide": True}}


class Views:
    """Every view twice: from each Transition (the reference) and from each batch's columns."""

    def __init__(self):
        self.ref: dict[str, list[bytes]] = {k: [] for k in [*TEXT, "json", "csv"]}
        self.cols: dict[str, list[bytes]] = {k: [] for k in self.ref}
        self.columns: dict[str, ColumnTransitions] = {}
        self.session = None

    def start(self, settings: prog.Settings, **kw) -> LiveSession:
        s = LiveSession(settings, keep_events=True, on_transition=self.transition, on_batch=self.batch, **kw)
        self.session = s
        clock = lambda: Clock(s.clock.offset, s.clock.start)  # noqa: E731 (each view its own cache)
        self.text = {k: TextView(clock(), **kw) for k, kw in TEXT.items()}
        self.json_clock, self.csv_rows, self.csv_clock = clock(), CsvRows(), clock()
        for k, kw in TEXT.items():
            self.columns[k] = ColumnTransitions(BatchFormatter(clock(), "text", **kw))
        self.columns["json"] = ColumnTransitions(BatchFormatter(clock(), "json"))
        self.columns["csv"] = ColumnTransitions(BatchFormatter(clock(), "csv"))
        for c in self.columns.values():
            c.attach(s)
        return s

    def transition(self, t):
        for k, v in self.text.items():
            t.lc.view_cache = None  # (a Lifecycle caches one view's rendering: here there are four)
            self.ref[k].append(v.transition(t).encode())
        self.ref["json"].append(dumps(transition_record(t, self.json_clock)).encode())
        self.ref["csv"] += self.csv_rows(transition_record(t, self.csv_clock, home=False)).encode().split(b"\n")  # (header first)

    def batch(self, events):
        for c in self.columns.values():
            c.on_batch(events)

    def poll(self, timeout_ms):
        self.session.poll(timeout_ms)
        self.take()

    def take(self):
        for k, c in self.columns.items():
            data = b"".join(c.chunks(rows=97))  # (pieces of 97 events' lines: what the CLI writes)
            if data:
                assert data.endswith(b"\n")
                self.cols[k] += data[:-1].split(b"\n")

    def assert_equal(self):
        for k in self.ref:
            ref, got = self.ref[k], self.cols[k]
            first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
            assert first is None and len(ref) == len(got), (
                f"{k}: {len(ref)} lines per event, {len(got)} from the columns; first difference at "
                f"{first}:\n{ref[first] if first is not None else ''}\n{got[first] if first is not None else ''}")
            assert self.columns[k].unmatched == 0


def _run_workload(v: Views, args: list[str]) -> str:
    p = subprocess.Popen([sys.executable, WORKLOAD, *args], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        v.poll(20)
    out = p.communicate(timeout=5)[0].strip()
    for _ in range(4):
        v.poll(30)
    return out


def _clean(report) -> bool:
    """Nothing lost and nothing out of order: a lost event is a gap to the tracker and not to
    the kernel's fold, and a change that arrived after later ones is 'out of order' to it."""
    return not report["events_lost"] and not report["transitions_out_of_order"]


@pytest.fixture(scope="module")
def traced():
    for _ in range(3):  # until a run loses nothing (other tests' loads on a busy host)
        pairs = preexisting_pairs()
        old = socket.create_server(("127.0.0.1", 0))  # a listener from before the trace: in no table
        v = Views()
        s = v.start(prog.Settings())
        assert not s.folds_only  # (kept events: the tracker follows every event, the reference)
        try:
            for _ in range(3):
                v.poll(20)
            finish_preexisting(pairs)
            c = socket.create_connection(old.getsockname(), timeout=5)
            a, _ = old.accept()  # its accepted socket has no owner until its own task acts
            c.close()
            a.close()
            old.close()
            for family in ("4", "6"):
                prefork_once(family)
            assert _run_workload(v, ["3", "2"]) == "DONE"
        finally:
            report = s.stop()
            v.take()
        if _clean(report):
            return v
    pytest.fail(f"every run lost events or had them out of order: {report['events_lost_by_kind']}")


@pytest.mark.privileged
def test_every_line_equals_the_per_event_views(traced):
    traced.assert_equal()


@pytest.mark.privileged
def test_the_lines_cover_the_hard_cases(traced):
    plain = [ln.decode() for ln in traced.cols["plain"]]
    assert len(plain) > 400
    assert sum(ln.endswith("  (TIME_WAIT)") for ln in plain) >= 3 * 9 * 2  # (3 rounds, 2 workers: 9 client closes each)
    # (the per-CPU ordering of a test's own checks is not asserted: only what was printed)
    assert any(re.search(r"LISTEN\s+-> CLOSE", ln) for ln in plain)  # listeners (the kernel's fold)
    assert any(re.search(r"^-\s+-\s", ln) for ln in plain)  # no owner known (yet)
    assert any(" - " in ln and "CLOSE       -> SYN_SENT" in ln for ln in plain)  # no local port yet
    assert any(ln.endswith(" -") for ln in plain)  # no time in the old state
    wide = [ln.decode() for ln in traced.cols["-w"]]
    assert any("::1 " in ln for ln in wide) and any("127.0.0.1 " in ln for ln in wide)
    records = [json.loads(ln) for ln in traced.cols["json"]]
    assert {r["family"] for r in records} >= {4, 6}
    assert {r["owner_source"] for r in records} >= {"connect", "listen", "io", "close", "listener", "none"}
    assert {r["role"] for r in records} >= {"active", "passive", "listener", "unknown"}
    assert traced.cols["csv"][0].startswith(b"time,ts_ns,conn_id,pid,comm,")
    assert traced.cols["csv"][0].endswith(b",ms,note")  # (the CSV row keeps its columns: no home)
    # each record carries its connection's home after the change: the fold's owner's cgroup
    mine = open("/proc/self/cgroup").read().strip().split("::", 1)[1]
    assert all(r["cgroup_id"] is not None for r in records if r["owner_source"] in ("connect", "listen"))
    assert all(r["cgroup_id"] is None and r["cgroup"] is None for r in records if r["owner_source"] == "none")
    assert any(r["cgroup"] == mine and r["container_id"] is None for r in records)


@pytest.mark.privileged
def test_map_full_strays_come_from_the_tracker_in_place():
    """--max-conns 1024 and 1500 connections held open at once: the sockets born while the map
    was full have no fold (their lines are the tracker's, put in at their rows); those that get
    an entry mid-life are folded by the kernel from then on only, which knows nothing of their
    start: their lines from then on may lack the owner, the role and the time that the tracker
    has from their start (the summary's `connection map full` says the map was full). Every
    other line is equal."""
    n = 1500
    for _ in range(3):  # until a run loses no event (another BPF program on a busy host)
        v = Views()
        closed = []
        s = v.start(prog.Settings(max_conns=1024), on_close=closed.append)
        try:
            p = subprocess.Popen([sys.executable, WORKLOAD, "hold", str(n)], stdout=subprocess.PIPE, text=True)
            int(p.stdout.readline())
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline:
                v.poll(50)
            assert p.communicate(timeout=5)[0].strip() == "DONE"
            for _ in range(6):
                v.poll(30)
        finally:
            report = s.stop()
            v.take()
        if _clean(report):
            break
    else:
        pytest.fail("every run lost events or had them out of order")
    assert report["conn_map_full"] > 0
    adopted = {lc.conn_id for lc in closed + s.still_open
               if lc.conn_id < ENTRYLESS_BASE and ENTRYLESS_NOTE in lc.incomplete}
    ref, got = v.ref["json"], v.cols["json"]
    assert len(ref) == len(got)
    strays, differ = 0, set()
    for i, (a, b) in enumerate(zip(ref, got)):
        ra, rb = json.loads(a), json.loads(b)
        strays += ra["conn_id"] >= ENTRYLESS_BASE
        if a != b:
            differ.add(i)
            assert ra["conn_id"] in adopted, (a, b)
            assert {k for k in ra if ra[k] != rb[k]} <= {"pid", "comm", "owner_source", "ms", "role"}, (a, b)
    assert strays > 100 and len(adopted) > 100 and v.columns["json"].unmatched == 0
    assert len(differ) < len(ref) / 4  # (those rows only)
    for k in TEXT:
        assert len(v.ref[k]) == len(v.cols[k])
        assert {i for i, (x, y) in enumerate(zip(v.ref[k], v.cols[k])) if x != y} <= differ


CLIENT_STEPS = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
                ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]


@pytest.mark.privileged
def test_cli_text_with_wall_time_from_the_columns():
    """`tcplife-trace -T` (no filter: the column path) on one known connection."""
    from test_cli import one_connection, traced as cli_traced
    rc, out, err, (srv, cpid) = cli_traced(["--duration", "3", "-T"], one_connection)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "OLDSTATE", "->",
                                "NEWSTATE", "MS"]
    mine = [ln.split() for ln in lines[1:] if ln.split()[1] == str(cpid) and str(srv.port) in ln.split()]
    assert [(f[7], f[9]) for f in mine] == CLIENT_STEPS
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", f[0]) for f in mine)
    assert mine[0][4] == "-" and mine[0][10] == "-"  # no local port yet, no time in CLOSE
    assert all(re.fullmatch(r"\d+\.\d{3}", f[10]) for f in mine[1:])
    assert mine[-1][11:] == ["(TIME_WAIT)"]
    # the accepted socket: the listener's owner from SYN_RECV on, then its own
    child = [ln.split() for ln in lines[1:] if ln.split()[4] == str(srv.port) and ln.split()[6] != "-"]
    assert [(f[7], f[9]) for f in child][:2] == [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")]
    assert {f[1] for f in child} <= {str(srv.pid), str(srv.worker_pid)}
    assert "lost 0" in err and "warning" not in err


@pytest.mark.privileged
def test_cli_json_from_the_columns():
    from test_cli import one_connection, traced as cli_traced
    rc, out, err, (srv, cpid) = cli_traced(["--duration", "3", "--json"], one_connection)
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in recs if srv.port in (r["lport"], r["rport"])]
    client = [r for r in mine if r["pid"] == cpid]
    assert [(r["oldstate"], r["newstate"]) for r in client] == CLIENT_STEPS
    assert client[0]["lport"] is None and client[0]["ms"] is None and client[1]["ms"] > 0
    assert [r["note"] for r in client] == [None] * 4 + ["TIME_WAIT"]
    assert {r["owner_source"] for r in client} == {"connect"} and {r["role"] for r in client} == {"active"}
    assert {r["family"] for r in mine} == {4} and all(r["type"] == "transition" for r in recs)
    assert len(mine) == 12  # listener 2, client 5, accepted child 5
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["type"] == "summary" and summary["events_lost"] == 0
