"""The column-wise lifecycles of a recording agree with the live state machine."""
import subprocess
import sys
import time

import pandas as pd
import pytest

from tcplife_trace import load, recording
from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.render.views import errno_name

from synthetic import stream
from tracing import Server, client

C, SRV, W, X = 100, 200, 201, 999
ROWS = [
    # listener and a child served by a worker (passive close)
    (0.0, "S", 1, "CLOSE", "LISTEN", SRV, 8080, 0),
    (5.0, "S", 2, "LISTEN", "SYN_RECV", C, 8080, 5555),
    (5.1, "S", 2, "SYN_RECV", "ESTABLISHED", C, 8080, 5555),
    (6.0, "IO", 2, W),
    (9.0, "S", 2, "ESTABLISHED", "CLOSE_WAIT", C, 8080, 5555),
    (9.2, "IO", 2, W, "eof"),
    (10.0, "S", 2, "CLOSE_WAIT", "LAST_ACK", W, 8080, 5555),
    (10.1, "S", 2, "LAST_ACK", "CLOSE", C, 8080, 5555),
    # active close into TIME_WAIT
    (0.0, "S", 3, "CLOSE", "SYN_SENT", C, 0, 80),
    (1.0, "S", 3, "SYN_SENT", "ESTABLISHED", C, 40000, 80),
    (11.0, "S", 3, "ESTABLISHED", "FIN_WAIT1", C, 40000, 80),
    (11.5, "S", 3, "FIN_WAIT1", "FIN_WAIT2", X, 40000, 80),
    (13.0, "S", 3, "FIN_WAIT2", "CLOSE", X, 40000, 80),
    # refused
    (20, "S", 4, "CLOSE", "SYN_SENT", C, 0, 81),
    (20.5, "RR", 4),
    (20.6, "S", 4, "SYN_SENT", "CLOSE", C, 40001, 81),
    (20.7, "E", 4, 111, 40001, 81),
    # keepalive timeout
    (30, "S", 5, "CLOSE", "SYN_SENT", C, 0, 82),
    (31, "S", 5, "SYN_SENT", "ESTABLISHED", C, 40002, 82),
    (4000, "RS", 5, 15, "ESTABLISHED"),
    (4000.01, "S", 5, "ESTABLISHED", "CLOSE", 0, 40002, 82),
    (4000.02, "E", 5, 110, 40002, 82),
    # local abort reporting ECONNRESET to itself
    (50, "S", 6, "CLOSE", "SYN_SENT", C, 0, 83),
    (51, "S", 6, "SYN_SENT", "ESTABLISHED", C, 40003, 83),
    (55, "S", 6, "ESTABLISHED", "CLOSE", C, 40003, 83),
    (55.001, "RS", 6, 14, "CLOSE"),
    (55.002, "E", 6, 104, 40003, 0),
    # born before the trace, closed by a worker, and one still open
    (60, "S", 7, "ESTABLISHED", "FIN_WAIT1", W, 8080, 6000, {"unseen": True}),
    (61, "S", 7, "FIN_WAIT1", "FIN_WAIT2", 0, 8080, 6000),
    (62, "S", 7, "FIN_WAIT2", "CLOSE", 0, 8080, 6000),
    (70, "S", 8, "CLOSE", "SYN_SENT", C, 0, 84),
    (71, "S", 8, "SYN_SENT", "ESTABLISHED", C, 40004, 84),
    # open before the trace and only read and written during it (no state change): still open;
    # one that closes after its first read (it started there); one destroyed unconnected
    (65, "IO", 9, W, {"unseen": True}),
    (66, "IO", 9, X, {"unseen": True}),
    (64, "IO", 10, W, {"unseen": True}),
    (67, "S", 10, "ESTABLISHED", "CLOSE_WAIT", 0, 8080, 6001),
    (68, "S", 10, "CLOSE_WAIT", "LAST_ACK", W, 8080, 6001),
    (68.5, "S", 10, "LAST_ACK", "CLOSE", 0, 8080, 6001),
    (69, "IO", 11, C),
    (69.5, "D", 11),
    (80, "S", 1, "LISTEN", "CLOSE", SRV, 8080, 0),
]


# the kernel's connection map full: events without a generation (gen 0), named by the socket
# address; some sockets get an entry later (the map had room again) and go on with a generation
A, B, P, Q, R = ({"skaddr": 0xA000 + i} for i in range(5))
MAP_FULL_ROWS = [
    (0.0, "S", 1, "CLOSE", "LISTEN", SRV, 8080, 0),
    # refused, no entry at all: the errno report has no generation either (joined on ports)
    (1.0, "S", 0, "CLOSE", "SYN_SENT", C, 0, 81, A),
    (1.5, "RR", 0, A),
    (1.6, "S", 0, "SYN_SENT", "CLOSE", C, 40001, 81, A),
    (1.7, "E", 0, 111, 40001, 81),
    # the same address born again: a new connection, still without an entry; a connect timeout
    (2.0, "S", 0, "CLOSE", "SYN_SENT", C, 0, 82, A),
    (3002.0, "S", 0, "SYN_SENT", "CLOSE", 0, 40002, 82, A),
    (3002.01, "E", 0, 110, 40002, 82),
    # a client born without an entry that gets one in ESTABLISHED, then closes first
    (5.0, "S", 0, "CLOSE", "SYN_SENT", C, 0, 8080, B),
    (5.1, "S", 0, "SYN_SENT", "ESTABLISHED", C, 40003, 8080, B),
    (7.0, "S", 50, "ESTABLISHED", "FIN_WAIT1", C, 40003, 8080, {**B, "unseen": True}),
    (7.1, "S", 50, "FIN_WAIT1", "FIN_WAIT2", X, 40003, 8080, B),
    (7.2, "S", 50, "FIN_WAIT2", "CLOSE", X, 40003, 8080, B),
    # its accepted half: no entry until the worker's first read
    (5.1, "S", 0, "LISTEN", "SYN_RECV", C, 8080, 40003, P),
    (5.2, "S", 0, "SYN_RECV", "ESTABLISHED", C, 8080, 40003, P),
    (6.0, "IO", 51, W, {**P, "unseen": True}),
    (7.1, "S", 51, "ESTABLISHED", "CLOSE_WAIT", C, 8080, 40003, P),
    (7.5, "S", 51, "CLOSE_WAIT", "LAST_ACK", W, 8080, 40003, P),
    (7.6, "S", 51, "LAST_ACK", "CLOSE", X, 8080, 40003, P),
    # aborted with SO_LINGER 0, never an entry
    (8.0, "S", 0, "CLOSE", "SYN_SENT", C, 0, 83, Q),
    (8.1, "S", 0, "SYN_SENT", "ESTABLISHED", C, 40004, 83, Q),
    (9.0, "S", 0, "ESTABLISHED", "CLOSE", C, 40004, 83, Q),
    (9.001, "RS", 0, 14, "CLOSE", Q),
    (9.002, "E", 0, 104, 40004, 0),
    # open without an entry, then its address is born again (with a generation): it ended unseen
    (10.0, "S", 0, "CLOSE", "SYN_SENT", C, 0, 84, R),
    (10.1, "S", 0, "SYN_SENT", "ESTABLISHED", C, 40005, 84, R),
    (20.0, "S", 60, "CLOSE", "SYN_SENT", C, 0, 85, R),
    (30.0, "S", 1, "LISTEN", "CLOSE", SRV, 8080, 0),
]


def live_view(events):
    closed = []
    t = Tracker(on_close=closed.append)
    t.feed_all(events)
    still = t.finish()
    return {lc.conn_id: lc for lc in closed}, {lc.conn_id: lc for lc in still}


def compare(frame, closed, still_open, offset=0):
    """offset: the recording's mono_to_wall_ns (the frame's times are wall clock)."""
    rows = frame.set_index("conn_id")
    assert set(rows.index) == set(closed) | set(still_open)
    for cid, lc in closed.items():
        r = rows.loc[cid]
        assert r.role == lc.role, cid
        assert (None if pd.isna(r.pid) else r.pid) == lc.owner_pid, cid
        assert r.owner_source == lc.owner_source, cid
        assert r.end_reason == lc.end_reason, cid
        assert (None if pd.isna(r.end_detail) else r.end_detail) == lc.end_detail, cid
        assert (r.errno if isinstance(r.errno, str) else None) == errno_name(lc.errno), cid
        assert bool(r.time_wait) == lc.time_wait, cid
        lp = None if pd.isna(r.listener_pid) else r.listener_pid
        assert lp == lc.listener_pid, cid
        want = None if lc.duration_ns is None else lc.duration_ns / 1e9
        assert (pd.isna(r.duration_s) and want is None) or abs(r.duration_s - want) < 1e-9, cid
    for cid, lc in {**closed, **still_open}.items():
        r = rows.loc[cid]
        assert r.birth_seen == lc.birth_seen, cid
        assert r.start.value == lc.start_ns + offset, cid
        assert r.path == " ".join(S(s).name for s in lc.path), cid
    for cid, lc in still_open.items():
        r = rows.loc[cid]
        assert r.end_reason == "open"
        assert (None if pd.isna(r.pid) else r.pid) == lc.owner_pid, cid
        assert r.owner_source == lc.owner_source, cid


def compare_durations(frame, closed):
    """Offline seconds per (connection, state) == the live tracker's state_ns."""
    got = {(int(r.conn_id), r.state): r.seconds for r in frame.itertuples()}
    want = {(cid, S(st).name): ns / 1e9 for cid, lc in closed.items() for st, ns in lc.state_ns.items()}
    assert set(want) <= set(got)
    assert all(abs(got[k] - v) < 1e-9 for k, v in want.items())


def recorded(events, path):
    """The events written to a recording at path, loaded back."""
    w = RecordingWriter(str(path), recording.header("none", 0))
    w.add(events)
    w.close()
    return load(str(path))


def test_synthetic_scenarios_agree(tmp_path):
    events = stream(ROWS)
    closed, still = live_view(events)
    rec = recorded(events, tmp_path / "r.arrow")
    compare(rec.lifecycles(), closed, still)
    compare_durations(rec.state_durations(), closed)
    assert set(still) == {8, 9}  # 11 was destroyed before any state change: never connected
    assert (still[9].owner_pid, still[9].owner_source, still[9].birth_seen, still[9].path) == (W, "io", False, [])
    assert closed[10].start_ns == 64_000_000 and closed[10].owner_source == "io"


def test_map_full_connections_agree(tmp_path):
    """Connections the kernel had no map entry for end at their CLOSE, with their roles, live
    and offline alike; one that got an entry mid-life is one connection, not two."""
    events = stream(MAP_FULL_ROWS)
    closed, still = live_view(events)
    rec = recorded(events, tmp_path / "r.arrow")
    frame = rec.lifecycles()
    compare(frame, closed, still)
    compare_durations(rec.state_durations(), closed)
    got = {(lc.role, lc.end_reason, lc.errno) for lc in closed.values()}
    assert got == {("listener", "listener_closed", None), ("active", "refused", 111), ("active", "timeout", 110),
                   ("active", "active_close", None), ("passive", "passive_close", None),
                   ("active", "local_abort", None), ("active", "unknown", None)}
    assert [lc.conn_id for lc in still.values()] == [60]
    joined = closed[50]
    assert [S(x).name for x in joined.path] == ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    assert joined.duration_ns == sum(joined.state_ns.values()) == 2_200_000
    assert (closed[51].owner_pid, closed[51].owner_source, closed[51].listener_pid) == (W, "io", SRV)
    assert frame.conn_id.isin([50, 51]).sum() == 2
    trans = rec.transitions
    assert set(trans.conn_id) == set(frame.conn_id)  # every state change belongs to its connection


@pytest.mark.privileged
def test_real_trace_recorded_agrees_with_live(tmp_path):
    from tcplife_trace.live import LiveSession
    p = tmp_path / "live.arrow"
    closed = []
    w = RecordingWriter(str(p), recording.header("none", 0))
    s = LiveSession(on_close=closed.append, recorder=w)
    for mode, cmode in (("normal", "normal"), ("prefork", "normal"), ("linger0", "wait")):
        srv = Server("4", mode)
        client("4", srv.port, cmode)
        srv.wait()
    client("4", srv.port)  # refused: the port is closed now
    subprocess.run([sys.executable, "-c", BURST], check=True, timeout=60)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        s.poll(50)
    s.stop()
    still = {lc.conn_id: lc for lc in s.still_open}
    rec = load(str(p))
    assert len(closed) > 200
    compare(rec.lifecycles(), {lc.conn_id: lc for lc in closed}, still, rec.mono_to_wall_ns)
    compare_durations(rec.state_durations(), {lc.conn_id: lc for lc in closed})


BURST = """
import socket
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(256)
for _ in range(100):
    c = socket.create_connection(ls.getsockname(), timeout=5); a, _ = ls.accept(); c.close(); a.close()
ls.close()
"""


@pytest.mark.privileged
def test_live_session_gives_the_same_frames_in_memory():
    from tcplife_trace.live import LiveSession
    closed = []
    s = LiveSession(on_close=closed.append, keep_events=True)
    srv = Server("6", "normal")
    client("6", srv.port)
    srv.wait()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        s.poll(50)
    s.stop()
    rec = s.recording()
    mine = {lc.conn_id: lc for lc in closed if srv.port in (lc.lport, lc.rport)}
    assert len(mine) == 3
    frame = rec.lifecycles()
    compare(frame[frame.conn_id.isin(list(mine))], mine, {}, rec.mono_to_wall_ns)
    assert rec.end["events_lost"] == 0 and "in memory" in repr(rec)
