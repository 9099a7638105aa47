"""A connection's events recorded out of the kernel's order: the offline frames follow the
kernel's per-connection sequence number (seq), the live Tracker counts them and puts the
early ones back in front."""
import subprocess
import sys
import time

import pandas as pd
import pytest

from tcplife_trace import load, recording
from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.probes.event_layout import EventKind
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.recording import RecordingWriter

from synthetic import stream
from test_offline_equivalence import compare, compare_durations, live_view, recorded

C, SRV, W, X = 100, 200, 201, 999
ROWS = [
    (0.0, "S", 1, "CLOSE", "LISTEN", SRV, 8080, 0),
    # a client that connects and closes first (its birth is what a full ring spills)
    (1.0, "S", 3, "CLOSE", "SYN_SENT", C, 0, 8080),
    (1.1, "S", 3, "SYN_SENT", "ESTABLISHED", C, 40000, 8080),
    (11.0, "S", 3, "ESTABLISHED", "FIN_WAIT1", C, 40000, 8080),
    (11.5, "S", 3, "FIN_WAIT1", "FIN_WAIT2", X, 40000, 8080),
    (13.0, "S", 3, "FIN_WAIT2", "CLOSE", X, 40000, 8080),
    # its accepted half, served by a worker, closed passively
    (1.1, "S", 4, "LISTEN", "SYN_RECV", C, 8080, 40000),
    (1.2, "S", 4, "SYN_RECV", "ESTABLISHED", C, 8080, 40000),
    (2.0, "IO", 4, W),
    (11.1, "S", 4, "ESTABLISHED", "CLOSE_WAIT", X, 8080, 40000),
    (12.0, "S", 4, "CLOSE_WAIT", "LAST_ACK", W, 8080, 40000),
    (12.1, "S", 4, "LAST_ACK", "CLOSE", X, 8080, 40000),
    # one still open at the end, its numbers about to wrap
    (20.0, "S", 5, "CLOSE", "SYN_SENT", C, 0, 8080),
    (20.1, "S", 5, "SYN_SENT", "ESTABLISHED", C, 40001, 8080),
    (25.0, "S", 5, "ESTABLISHED", "FIN_WAIT1", C, 40001, 8080),
    (25.5, "S", 5, "FIN_WAIT1", "FIN_WAIT2", X, 40001, 8080),
    (90, "S", 1, "LISTEN", "CLOSE", SRV, 8080, 0),
]
FIRST_SEQ = {5: 65534}  # 65534, 65535, 0, 1: the kernel's 16-bit counter wraps


def numbered(events):
    """seq as the kernel gives it: each connection's events counted from its first."""
    nxt, out = dict(FIRST_SEQ), []
    for e in events:
        s = nxt.get(e.gen, 0)
        nxt[e.gen] = (s + 1) & 0xFFFF
        out.append(e._replace(seq=s))
    return out


def in_time_order(events):
    return sorted(events, key=lambda e: e.ts_ns)


def spilled(events, gen, which):
    """The overflow path when the consumer was behind: these events of `gen` (positions
    among its events) arrive at the end, after every later event of their connection."""
    mine = [i for i, e in enumerate(events) if e.gen == gen]
    late = {mine[k] for k in which}
    return [e for i, e in enumerate(events) if i not in late] + [events[i] for i in sorted(late)]


def frames(events, tmp_path, name):
    return recorded(events, tmp_path / f"{name}.arrow")


def _same_frames(a, b):
    pd.testing.assert_frame_equal(a.lifecycles(), b.lifecycles())
    pd.testing.assert_frame_equal(a.state_durations(), b.state_durations())
    key = ["conn_id", "time"]  # (the transitions frame is in recorded order)
    ta = a.transitions.sort_values(key, kind="stable").reset_index(drop=True)
    tb = b.transitions.sort_values(key, kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(ta, tb)


def test_offline_frames_follow_the_kernels_order(tmp_path):
    events = in_time_order(numbered(stream(ROWS)))
    good = frames(events, tmp_path, "good")
    assert good.columns().by_connection().resequenced == 0
    # the client's birth (connect, handshake) spilled; a middle change of the server's
    # half; the open one's first two, across the wrap of its numbers
    late = spilled(spilled(spilled(events, 3, [0, 1]), 4, [3]), 5, [0, 1])
    assert [e.gen for e in late[-5:]] == [3, 3, 4, 5, 5]
    bad = frames(late, tmp_path, "late")
    assert bad.columns().by_connection().resequenced == 3
    _same_frames(bad, good)
    lc = bad.lifecycles().set_index("conn_id")
    assert lc.loc[3, "path"] == "CLOSE SYN_SENT ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE"
    assert lc.loc[3, "birth_seen"] and lc.loc[3, "owner_source"] == "connect"
    assert abs(lc.loc[3, "duration_s"] - 0.012) < 1e-9
    assert lc.loc[5, "path"] == "CLOSE SYN_SENT ESTABLISHED FIN_WAIT1 FIN_WAIT2"
    assert (bad.state_durations().seconds >= 0).all()
    assert (bad.transitions.ms_in_old.dropna() >= 0).all()


def test_numbers_that_say_nothing_keep_recorded_order(tmp_path):
    """Imported text and rows without a map entry have no sequence (all 0): recorded order."""
    events = in_time_order(stream(ROWS))
    a = frames(events, tmp_path, "a")
    assert a.columns().by_connection().resequenced == 0
    assert a.lifecycles().set_index("conn_id").loc[3, "path"] == "CLOSE SYN_SENT ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE"


def test_tracker_counts_late_changes_and_puts_early_ones_in_front(tmp_path):
    events = in_time_order(numbered(stream(ROWS)))
    want_closed, want_open = live_view(events)
    late = spilled(spilled(events, 3, [0, 1]), 5, [0, 1])
    t = Tracker(on_close=(closed := []).append)
    shown = []
    t.on_transition = shown.append
    t.feed_all(late)
    still = t.finish()
    assert t.counters.out_of_order == 4
    assert t.counters.sequence_gaps == 0
    assert sum(tr.note == "out of order" for tr in shown) == 4  # shown as they arrive
    got_closed = {lc.conn_id: lc for lc in closed}
    got_open = {lc.conn_id: lc for lc in still}
    assert set(got_closed) == set(want_closed) and set(got_open) == set(want_open) == {5}
    for got, want in ((got_closed, want_closed), (got_open, want_open)):
        for cid, w in want.items():
            g = got[cid]
            for f in ("role", "birth_seen", "start_ns", "end_ns", "path", "state_ns", "owner_pid",
                      "owner_source", "end_reason", "time_wait", "lport", "rport", "incomplete"):
                assert getattr(g, f) == getattr(w, f), (cid, f)
    # and the live view of the late stream agrees with the offline frames of it
    rec = frames(late, tmp_path, "late")
    compare(rec.lifecycles(), got_closed, got_open)
    compare_durations(rec.state_durations(), got_closed)


def test_tracker_counts_a_late_change_it_cannot_place():
    """A change from between two already applied: the time in those states was counted, so
    it is left out, counted, and the lifecycle says so."""
    events = in_time_order(numbered(stream(ROWS)))
    late = spilled(events, 4, [3])  # ESTABLISHED -> CLOSE_WAIT after CLOSE_WAIT -> LAST_ACK
    t = Tracker(on_close=(closed := []).append)
    t.feed_all(late)
    t.finish()
    assert t.counters.out_of_order == 1
    lc = {lc.conn_id: lc for lc in closed}[4]
    assert lc.incomplete == ["missed events between ESTABLISHED and CLOSE_WAIT",
                             "a change ESTABLISHED -> CLOSE_WAIT arrived after later ones: left out"]
    assert [S(s).name for s in lc.path] == ["LISTEN", "SYN_RECV", "ESTABLISHED", "LAST_ACK", "CLOSE"]
    assert lc.state_ns == {S.SYN_RECV: 100_000, S.LAST_ACK: 100_000}  # not the ESTABLISHED it cannot place


CHURN = """
import socket, sys, time
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(64)
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end and n < 60000:
    c = socket.create_connection(ls.getsockname(), timeout=5); a, _ = ls.accept(); c.close(); a.close()
    n += 1
"""


@pytest.mark.privileged
def test_events_read_during_the_offset_check_are_recorded_first(tmp_path):
    """The start-up offset check reads the ring before anything is recorded; the events of
    others it read meanwhile are the oldest, and were recorded after those the pump thread
    read during the first look at the sockets (found as a connection whose CLOSE ->
    SYN_SENT was recorded after its close, -10 ms in CLOSE offline)."""
    from tcplife_trace.live import LiveSession
    churn = subprocess.Popen([sys.executable, "-c", CHURN, "6"])
    try:
        for attempt in range(5):  # the check must have read some of the churn's events
            path = tmp_path / f"r{attempt}.arrow"
            s = LiveSession(recorder=RecordingWriter(str(path), recording.header("none", 0)))
            # (ts_ns, gen, seq) of its events (its LIFE records go to the recording's lives)
            early = [(e[0], e[2], e[20]) for e in s._early if e[13] != int(EventKind.LIFE)]
            with s.pumping():
                time.sleep(0.3)
            s.poll(10)
            s.stop()
            if early:
                break
    finally:
        churn.wait(timeout=30)
    assert early, "the offset check read none of the churn's events in 5 tries"
    ev = load(str(path)).events.select(["ts_ns", "gen", "seq"]).to_pylist()
    assert [(e["ts_ns"], e["gen"], e["seq"]) for e in ev[:len(early)]] == early
    assert len(ev) > len(early)  # and the pump's came after them
    assert load(str(path)).columns().by_connection().resequenced == 0
    assert s.tracker.counters.out_of_order == 0


def test_the_exit_summary_says_how_many_transitions_came_out_of_order():
    """Nothing silent: a late transition the tracker had to put back (or leave out) is in the
    summary's inconsistencies line, as the other disorders are."""
    from tcplife_trace.render.views import summary_text
    report = {"duration_s": 1.0, "connections_seen": 1, "closed": 1, "still_open": 0, "filters": "none",
              "end_reasons": {}, "state_times": [], "events_lost_by_kind": {}, "events_received": 5,
              "events_emitted_by_kernel": 5, "events_lost": 0, "conn_map_full": 0, "evictions": 0,
              "sequence_gaps": 0, "unmatched_errors": 0, "overflow_out_of_order": 0,
              "transitions_out_of_order": 0}
    assert "inconsistencies" not in summary_text(report)
    line = [ln for ln in summary_text({**report, "transitions_out_of_order": 2}).splitlines()
            if "inconsistencies" in ln]
    assert line and "2 transitions that arrived after a later one of their connection" in line[0]
