"""A recording's own filters: analyze shows what the live session showed (its -p/-L/-D/-4/-6,
by the live rule), --all-recorded everything that reached the file; old headers, fleet mode."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from tcplife_trace import fleet, load, recording
from tcplife_trace.cli import main
from tcplife_trace.probes.filters import Filters
from tcplife_trace.recording import RecordingError, RecordingWriter

from synthetic import stream
from test_offline_equivalence import ROWS

MONO_TO_WALL = 1_800_000_000_000_000_000
ALL_IDS = set(range(1, 11))             # the connections of ROWS
WORKER_IDS = {2, 7, 9, 10}              # that pid 201 (the pre-forked worker) read, wrote or closed
PORT_8080_IDS = {1, 2, 7, 10}


def write(path, filters, host=None):
    w = RecordingWriter(str(path), recording.header(filters, MONO_TO_WALL, host=host))
    w.add(stream(ROWS))
    w.close({"events_lost": 0})
    return str(path)


def analyzed(capsys, *args):
    assert main(["analyze", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def ids(doc):
    return {r["conn_id"] for r in doc["lifecycles"]}


def test_the_column_rule_is_the_live_rule_on_every_combination():
    """Filters.match_columns (the recording's) against Filters.match (the live Tracker's) on
    every combination of the values the rule tells apart."""
    filters = [Filters(pids=p, lports=lp, rports=rp, family=f)
               for p in ((), (7,)) for lp in ((), (80,)) for rp in ((), (443,)) for f in (None, 4, 6)]
    cases = list(itertools.product((None, 4, 6), (None, 80, 81), (None, 443, 444),
                                   ("active", "passive", "listener", "unknown"), ((), (7,), (8,), (7, 8))))
    for f in filters:
        got = f.match_columns(family=np.array([c[0] or 0 for c in cases]), lport=np.array([c[1] or 0 for c in cases]),
                              rport=np.array([c[2] or 0 for c in cases]),
                              listener=np.array([c[3] == "listener" for c in cases]),
                              owned=np.array([bool(set(c[4]) & set(f.pids)) for c in cases]))
        want = [f.match(family=c[0], lport=c[1], rport=c[2], role=c[3], owner_pids=c[4]) for c in cases]
        assert list(got) == want, f


def test_header_keeps_the_filters_structured_and_as_text(tmp_path):
    f = Filters(pids=(201, 5), lports=(8080,), family=4)
    head = recording.read_header(write(tmp_path / "r.arrow", f))
    assert head["filters"] == "pid 201,5; lport 8080; IPv4"
    assert head["filter_spec"] == {"pids": [201, 5], "lports": [8080], "rports": [], "family": 4}
    assert recording.recorded_filters(head, "x") == f


def test_a_recording_shows_what_its_filters_keep_unless_all_recorded(tmp_path, capsys):
    path = write(tmp_path / "r.arrow", Filters(pids=(201,)))
    doc = analyzed(capsys, path)
    assert ids(doc) == WORKER_IDS
    assert doc["recordings"][0]["filters_applied"] == "pid 201"
    assert set(doc["state_durations"][0]) and {r["conn_id"] for r in doc["state_durations"]} <= WORKER_IDS
    assert ids(analyzed(capsys, path, "--all-recorded")) == ALL_IDS
    # given filters narrow the recorded ones: both must hold
    assert ids(analyzed(capsys, path, "-L", "8080")) == WORKER_IDS & PORT_8080_IDS
    # conn 2: the worker's, accepted on pid 200's listener: both keep it
    assert ids(analyzed(capsys, path, "-p", "200")) == {2}
    assert ids(analyzed(capsys, path, "-p", "200", "--all-recorded")) == {1, 2}
    assert ids(analyzed(capsys, path, "-p", "100")) == set()
    assert main(["analyze", path]) == 0
    out = capsys.readouterr().out
    assert "recorded filters pid 201 (applied, as the live session did; --all-recorded" in out
    assert f"{len(WORKER_IDS)} connections" in out
    assert main(["analyze", path, "--all-recorded"]) == 0
    assert "recorded filters pid 201 (not applied: --all-recorded)" in capsys.readouterr().out
    # the library: the same frames from load(), and everything with all_recorded
    rec = load(path)
    assert set(rec.lifecycles().conn_id) == WORKER_IDS
    assert set(rec.transitions.conn_id) == WORKER_IDS - {9}  # (9 changed no state)
    assert set(rec.by_process().reset_index()["pid"].dropna()) == {201}
    assert set(rec.state_durations().conn_id) <= WORKER_IDS
    assert set(load(path, all_recorded=True).lifecycles().conn_id) == ALL_IDS


@pytest.mark.parametrize("text,want", [
    ("none", ALL_IDS), ("pid 201", WORKER_IDS), ("lport 8080", PORT_8080_IDS),
    ("pid 201; lport 8080", WORKER_IDS & PORT_8080_IDS), ("IPv6", {9}),  # 9: no tuple, family unknown
])
def test_old_headers_give_their_filters_as_text(tmp_path, capsys, text, want):
    """Recordings made before filter_spec: the describe() text is read back."""
    path = write(tmp_path / "old.arrow", text)
    assert "filter_spec" not in recording.read_header(path)
    assert ids(analyzed(capsys, path)) == want
    assert ids(analyzed(capsys, path, "--all-recorded")) == ALL_IDS


@pytest.mark.parametrize("text", ["pid abc", "port 80", "pid 201; pid 202", "IPv5", "pid 0", ""])
def test_a_header_whose_filters_cannot_be_read_is_one_line(tmp_path, capsys, text):
    path = write(tmp_path / "odd.arrow", text)
    assert main(["analyze", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "cannot be read" in err[0] and "--all-recorded" in err[0], err
    assert ids(analyzed(capsys, path, "--all-recorded")) == ALL_IDS
    with pytest.raises(RecordingError, match="cannot be read"):
        load(path)


def test_files_with_different_filters_each_keep_their_own(tmp_path, capsys):
    """Two recordings of one host analysed as one: each file's own filters."""
    a = write(tmp_path / "a.arrow", Filters(lports=(8080,)))
    b = write(tmp_path / "b.arrow", Filters(pids=(201,)))
    doc = analyzed(capsys, a, b)
    tag = 1 << 48  # the second file's ids
    assert ids(doc) == PORT_8080_IDS | {tag + i for i in WORKER_IDS}
    assert [r["filters_applied"] for r in doc["recordings"]] == ["lport 8080", "pid 201"]
    assert ids(analyzed(capsys, a, b, "--all-recorded")) == ALL_IDS | {tag + i for i in ALL_IDS}


@pytest.mark.parametrize("engine", ["pandas", "dask"])
def test_fleet_applies_each_files_recorded_filters(tmp_path, engine):
    a = write(tmp_path / "a.arrow", Filters(pids=(201,)), host="alpha")
    b = write(tmp_path / "b.arrow", "lport 8080", host="beta")  # an old header
    c = write(tmp_path / "c.arrow", Filters(), host="gamma")
    kw = {"workers": 1} if engine == "dask" else {}
    out = fleet.analyze([a, b, c], engine, **kw)
    got = {h: set(g.conn_id.astype(int) & ((1 << 48) - 1)) for h, g in out["lifecycles"].groupby("host", observed=True)}
    assert got == {"alpha": WORKER_IDS, "beta": PORT_8080_IDS, "gamma": ALL_IDS}
    assert out["recorded_filters"][a].startswith("pid 201 (applied")
    assert out["recorded_filters"][c] == "none"
    assert set(out["state_durations"].conn_id.astype(int) & ((1 << 48) - 1)) <= ALL_IDS
    text = fleet.text(out)
    assert f"{a}: recorded filters pid 201 (applied" in text and f"{b}: recorded filters lport 8080" in text
    every = fleet.analyze([a, b, c], engine, all_recorded=True, **kw)
    assert len(every["lifecycles"]) == 3 * len(ALL_IDS)
    narrowed = fleet.analyze([a, b, c], engine, filters=Filters(lports=(8080,)), **kw)
    got = {h: set(g.conn_id.astype(int) & ((1 << 48) - 1)) for h, g in narrowed["lifecycles"].groupby("host", observed=True)}
    assert got == {"alpha": WORKER_IDS & PORT_8080_IDS, "beta": PORT_8080_IDS, "gamma": PORT_8080_IDS}


def test_fleet_names_a_file_whose_filters_cannot_be_read(tmp_path, capsys):
    a = write(tmp_path / "a.arrow", Filters(pids=(201,)), host="alpha")
    b = write(tmp_path / "b.arrow", "pid x", host="beta")
    with pytest.raises(RecordingError, match="b.arrow: the filters it was recorded with cannot be read"):
        fleet.analyze([a, b])
    assert main(["analyze", a, b]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert len(fleet.analyze([a, b], all_recorded=True)["lifecycles"]) == 2 * len(ALL_IDS)


# -- a real recording ------------------------------------------------------------------------

# Two servers on loopback, each accepting N connections, and a client that connects to
# them in turn: the -p target's accepted sockets and, at the same time, another process's.
SERVER = r"""
import socket, sys
n = int(sys.argv[1])
ls = socket.socket()
ls.settimeout(10)
ls.bind(("127.0.0.1", 0))
ls.listen(64)
print(ls.getsockname()[1], flush=True)
for _ in range(n):
    c, _ = ls.accept()
    c.settimeout(10)
    while c.recv(100):
        pass
    c.close()
ls.close()
"""
CLIENT = r"""
import socket, sys
n, ports = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
for _ in range(n):
    for port in ports:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"x" * 10)
        s.close()
"""
N = 20
# another process's connection to itself, open past the end of the trace
HOLD = r"""
import socket, time
ls = socket.socket(); ls.settimeout(10); ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname(), timeout=10); a, _ = ls.accept()
print(ls.getsockname()[1], flush=True)
time.sleep(30)
"""


@pytest.mark.privileged
def test_a_real_recording_analysed_as_the_live_run_showed_it(tmp_path, capsys):
    from test_cli import traced
    target = subprocess.Popen([sys.executable, "-c", SERVER, str(N)], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", SERVER, str(N)], stdout=subprocess.PIPE, text=True)
    holder = []
    try:
        tport, oport = int(target.stdout.readline()), int(other.stdout.readline())
        path = tmp_path / "p.arrow"

        def workload():
            holder.append(subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True))
            subprocess.run([sys.executable, "-c", CLIENT, str(N), str(tport), str(oport)], check=True, timeout=60)
            target.wait(timeout=15)
            other.wait(timeout=15)
            return int(holder[0].stdout.readline())
        rc, out, err, hport = traced(["-p", str(target.pid), "--duration", "4", "--json", "--lifecycles",
                                      "--record", str(path)], workload)
    finally:
        for p in (target, other, *holder):
            p.kill()
            p.wait()
    assert rc == 0, err
    live = [json.loads(line) for line in out.splitlines()]
    live = [r for r in live if r.get("type") == "lifecycle"]
    fields = ("conn_id", "pid", "lport", "rport", "end_reason")
    want = sorted(tuple(r[k] for k in fields) for r in live)
    # the target's listener and its N accepted connections, nothing of the other server's
    assert sum(r["lport"] == tport and r["role"] == "passive" for r in live) == N
    assert not any({oport, hport} & {r["lport"], r["rport"]} for r in live)  # not even the open one
    assert all(r["pid"] == target.pid for r in live), [r for r in live if r["pid"] != target.pid]

    doc = analyzed(capsys, str(path))
    got = sorted(tuple(r[k] for k in fields) for r in doc["lifecycles"])
    assert got == want
    assert doc["recordings"][0]["filters_applied"] == f"pid {target.pid}"
    # what reached the file besides: the other server's accepted sockets (the kernel cannot
    # tell their owner at SYN_RECV), shown on asking
    every = analyzed(capsys, str(path), "--all-recorded")["lifecycles"]
    others = [r for r in every if r["lport"] == oport and r["role"] == "passive"]
    assert len(others) == N, [(r["lport"], r["role"]) for r in every]
    held = [r for r in every if r["lport"] == hport and r["role"] == "passive"]
    assert [r["end_reason"] for r in held] == ["open"], held
    assert {r["conn_id"] for r in every} > {r[0] for r in want}


# a connection made by one process and written by another (a forked child sharing the socket),
# and an accepted socket whose listener's owner never touches it
SHARED = [
    (100.0, "S", 20, "CLOSE", "SYN_SENT", 300, 0, 90),
    (100.5, "S", 20, "SYN_SENT", "ESTABLISHED", 0, 40020, 90),
    (101.0, "IO", 20, 301),
    (102.0, "S", 20, "ESTABLISHED", "FIN_WAIT1", 300, 40020, 90),
    (102.5, "S", 20, "FIN_WAIT1", "FIN_WAIT2", 0, 40020, 90),
    (103.0, "S", 20, "FIN_WAIT2", "CLOSE", 0, 40020, 90),
]


@pytest.mark.parametrize("f", [
    Filters(pids=(301,)), Filters(pids=(300,)), Filters(pids=(200,)), Filters(pids=(201,)), Filters(pids=(100,)),
    Filters(pids=(999,)), Filters(lports=(8080,)), Filters(rports=(80, 90)), Filters(family=4), Filters(family=6),
    Filters(pids=(201, 100), rports=(84, 5555)), Filters(pids=(301,), lports=(40020,)),
])
def test_recorded_filters_keep_what_the_live_tracker_keeps(tmp_path, capsys, f):
    """Every connection the Tracker reports under these filters (finished, or still open and
    kept), and only those, by the frames of a recording made with them; the pids of every
    process that acted on a connection count (301 only wrote on connection 20)."""
    from tcplife_trace.analysis.lifecycle import Tracker
    events = stream(ROWS + SHARED)
    closed = []
    t = Tracker(f, on_close=closed.append)
    t.feed_all(events)
    still = [lc for lc in t.finish() if t.kept(lc)]
    live = {lc.conn_id for lc in closed} | {lc.conn_id for lc in still}
    w = RecordingWriter(str(tmp_path / "f.arrow"), recording.header(f, MONO_TO_WALL))
    w.add(events)
    w.close({"events_lost": 0})
    assert ids(analyzed(capsys, str(tmp_path / "f.arrow"))) == live
    # the same filters given to analyze of an unfiltered recording
    plain = write(tmp_path / "plain.arrow", Filters())
    w = RecordingWriter(plain + "2", recording.header(Filters(), MONO_TO_WALL))
    w.add(events)
    w.close({"events_lost": 0})
    args = [*(["-p", ",".join(map(str, f.pids))] if f.pids else []),
            *(["-L", ",".join(map(str, f.lports))] if f.lports else []),
            *(["-D", ",".join(map(str, f.rports))] if f.rports else []),
            *([f"-{f.family}"] if f.family else [])]
    assert ids(analyzed(capsys, plain + "2", *args)) == live
