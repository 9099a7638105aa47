"""The connection state machine on synthetic streams, one test per path."""
import pytest

from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.probes.filters import Filters
from tcplife_trace.probes.tcp_states import TcpState as S

from synthetic import stream

CLIENT, SERVER, WORKER, OTHER = 100, 200, 201, 999


def run(rows, filters=None, **kw):
    closed, transitions = [], []
    t = Tracker(filters, on_close=closed.append, on_transition=transitions.append, **kw)
    t.feed_all(stream(rows))
    still_open = t.finish()
    return closed, still_open, transitions, t


def only(closed):
    assert len(closed) == 1, [(c.conn_id, c.path) for c in closed]
    return closed[0]


def names(lc):
    return [S(s).name for s in lc.path]


def test_active_open_active_close_enters_time_wait():
    closed, still_open, transitions, _ = run([
        (0.0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1.0, "S", 1, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80),
        (11.0, "S", 1, "ESTABLISHED", "FIN_WAIT1", CLIENT, 40000, 80),
        (11.5, "S", 1, "FIN_WAIT1", "FIN_WAIT2", OTHER, 40000, 80),
        (13.0, "S", 1, "FIN_WAIT2", "CLOSE", OTHER, 40000, 80),
        (13.1, "D", 1),
    ])
    lc = only(closed)
    assert not still_open
    assert (lc.role, lc.owner_pid, lc.owner_source) == ("active", CLIENT, "connect")
    assert (lc.lport, lc.rport) == (40000, 80)  # sport filled in after SYN_SENT
    assert names(lc) == ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    assert lc.end_reason == "active_close" and lc.time_wait
    assert lc.state_ns == {S.SYN_SENT: 1_000_000, S.ESTABLISHED: 10_000_000,
                           S.FIN_WAIT1: 500_000, S.FIN_WAIT2: 1_500_000}
    assert sum(lc.state_ns.values()) == lc.duration_ns == 13_000_000
    assert transitions[-1].note == "TIME_WAIT"
    assert transitions[1].dur_ns == 1_000_000


def test_passive_open_close_owner_is_the_worker_not_the_softirq_task():
    closed, _, transitions, _ = run([
        (0.0, "S", 1, "CLOSE", "LISTEN", SERVER, 8080, 0),
        (5.0, "S", 2, "LISTEN", "SYN_RECV", CLIENT, 8080, 5555),   # softirq: current is the client
        (5.1, "S", 2, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5555),
        (6.0, "IO", 2, WORKER),
        (9.0, "S", 2, "ESTABLISHED", "CLOSE_WAIT", CLIENT, 8080, 5555),
        (9.2, "EOF", 2, WORKER),
        (10.0, "S", 2, "CLOSE_WAIT", "LAST_ACK", WORKER, 8080, 5555),
        (10.1, "S", 2, "LAST_ACK", "CLOSE", CLIENT, 8080, 5555),
        (10.2, "D", 2),
    ])
    lc = only(closed)
    assert (lc.role, lc.owner_pid, lc.owner_source, lc.listener_pid) == ("passive", WORKER, "io", SERVER)
    assert lc.end_reason == "passive_close" and not lc.time_wait
    assert lc.eof_ns == 9_200_000
    assert sum(lc.state_ns.values()) == lc.duration_ns == 5_100_000
    # before the worker's first I/O the child is shown under the listener's owner
    assert transitions[1].lc.owner_pid == WORKER  # same object, now updated
    assert CLIENT not in lc.pids


def test_passive_child_without_io_falls_back_to_closer_then_listener():
    closed, _, _, _ = run([
        (0.0, "S", 1, "CLOSE", "LISTEN", SERVER, 8080, 0),
        (1.0, "S", 2, "LISTEN", "SYN_RECV", CLIENT, 8080, 5555),
        (1.1, "S", 2, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5555),
        (2.0, "S", 2, "ESTABLISHED", "FIN_WAIT1", WORKER, 8080, 5555),
        (2.1, "S", 2, "FIN_WAIT1", "FIN_WAIT2", CLIENT, 8080, 5555),
        (2.2, "S", 2, "FIN_WAIT2", "CLOSE", CLIENT, 8080, 5555),
        (2.3, "D", 2),
        (3.0, "S", 3, "LISTEN", "SYN_RECV", CLIENT, 8080, 5556),
        (3.1, "S", 3, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5556),
        (3.2, "RR", 3),
        (3.3, "S", 3, "ESTABLISHED", "CLOSE", CLIENT, 8080, 5556),
        (3.4, "D", 3),
    ])
    closer, reset = closed
    assert (closer.owner_pid, closer.owner_source, closer.end_reason) == (WORKER, "close", "active_close")
    assert (reset.owner_pid, reset.owner_source, reset.end_reason) == (SERVER, "listener", "reset_by_peer")


def test_simultaneous_close_goes_through_closing():
    closed, _, _, _ = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "S", 1, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80),
        (2, "S", 1, "ESTABLISHED", "FIN_WAIT1", CLIENT, 40000, 80),
        (3, "S", 1, "FIN_WAIT1", "CLOSING", OTHER, 40000, 80),
        (4, "S", 1, "CLOSING", "CLOSE", OTHER, 40000, 80),
        (4.1, "D", 1),
    ])
    lc = only(closed)
    assert lc.end_reason == "active_close" and lc.time_wait
    assert lc.state_ns[S.CLOSING] == 1_000_000


@pytest.mark.parametrize("state,errno,reason", [
    ("ESTABLISHED", 104, "reset_by_peer"),
    ("CLOSE_WAIT", 32, "reset_by_peer"),
    ("FIN_WAIT1", None, "reset_by_peer"),
    ("FIN_WAIT2", 104, "reset_by_peer"),
    ("LAST_ACK", None, "reset_by_peer"),   # orphaned: no errno report
    ("SYN_SENT", 111, "refused"),
    ("SYN_RECV", None, "reset_by_peer"),
])
def test_rst_received_in_each_state(state, errno, reason):
    path = {"ESTABLISHED": ["ESTABLISHED"], "CLOSE_WAIT": ["ESTABLISHED", "CLOSE_WAIT"],
            "FIN_WAIT1": ["ESTABLISHED", "FIN_WAIT1"], "FIN_WAIT2": ["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"],
            "LAST_ACK": ["ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"], "SYN_SENT": [],
            "SYN_RECV": ["SYN_RECV"]}[state]
    rows = [(0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80)]
    prev = "SYN_SENT"
    for i, s in enumerate(path, 1):
        rows.append((i, "S", 1, prev, s, OTHER, 40000, 80))
        prev = s
    rows += [(10, "RR", 1), (10.01, "S", 1, prev, "CLOSE", OTHER, 40000, 80)]
    if errno:
        rows.append((10.02, "E", 1, errno, 40000, 80))
    rows.append((10.03, "D", 1))
    lc = only(run(rows)[0])
    assert lc.end_reason == reason
    assert lc.errno == errno
    assert not lc.time_wait  # a reset in FIN_WAIT2 is not a TIME_WAIT entry


def test_connect_timeout_and_keepalive_timeout():
    closed, _, _, _ = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (3070, "S", 1, "SYN_SENT", "CLOSE", 0, 40000, 80),
        (3070.01, "E", 1, 110, 40000, 80),
        (0, "S", 2, "CLOSE", "SYN_SENT", CLIENT, 0, 81),
        (1, "S", 2, "SYN_SENT", "ESTABLISHED", CLIENT, 40001, 81),
        (4000, "RS", 2, 15, "ESTABLISHED"),
        (4000.01, "S", 2, "ESTABLISHED", "CLOSE", 0, 40001, 81),
        (4000.02, "E", 2, 110, 40001, 81),
    ])
    syn, ka = closed
    assert (syn.end_reason, syn.errno) == ("timeout", 110)
    assert "connect" in syn.end_detail
    assert (ka.end_reason, ka.end_detail) == ("timeout", "keepalive probes unanswered")


def test_local_abort_reset_sent_after_close_within_hold():
    closed, _, _, _ = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "S", 1, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80),
        (5, "S", 1, "ESTABLISHED", "CLOSE", CLIENT, 40000, 80),
        (5.001, "RS", 1, 14, "CLOSE"),
        (5.002, "D", 1),
    ])
    lc = only(closed)
    from tcplife_trace.analysis import end_rules as er
    assert lc.end_reason == "local_abort"
    # reason 14 named as this kernel's BTF names it (TCP_STATE since 6.10)
    assert lc.end_detail == f"RST sent ({er.kernel_reset_reasons().name(14)}) in ESTABLISHED"


def test_abort_reporting_econnreset_to_itself_is_still_local():
    closed, _, _, _ = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "S", 1, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80),
        (5, "S", 1, "ESTABLISHED", "CLOSE", CLIENT, 40000, 80),
        (5.001, "RS", 1, 14, "CLOSE"),
        (5.002, "E", 1, 104, 40000, 0),
    ])
    lc = only(closed)
    # the ECONNRESET went to the aborting socket itself, which its owner had closed: nobody saw it
    assert (lc.end_reason, lc.errno) == ("local_abort", None)


def test_close_is_held_for_trailing_events_then_released_by_advance():
    closed = []
    t = Tracker(on_close=closed.append, hold_ns=50_000_000)
    t.feed_all(stream([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (3, "S", 1, "SYN_SENT", "CLOSE", CLIENT, 40000, 80),
    ]))
    t.advance(40_000_000)
    assert closed == []  # errno may still come
    t.feed_all(stream([(4, "E", 0, 111, 40000, 80)]))  # no socket pointer: joined on ports
    t.advance(60_000_000)
    lc = only(closed)
    assert (lc.end_reason, lc.errno) == ("refused", 111)
    assert t.counters.unmatched_errors == 0


def test_skaddr_reuse_keeps_generations_apart():
    sk = {"skaddr": 0xABC}
    closed, _, _, _ = run([
        (0, "S", 7, "CLOSE", "SYN_SENT", CLIENT, 0, 80, sk),
        (1, "S", 7, "SYN_SENT", "CLOSE", 0, 40000, 80, sk),
        (1.01, "D", 7, sk),
        (1.02, "S", 8, "CLOSE", "SYN_SENT", OTHER, 0, 81, sk),      # same address, 10 us later
        (2, "S", 8, "SYN_SENT", "ESTABLISHED", OTHER, 40002, 81, sk),
        (3, "S", 8, "ESTABLISHED", "FIN_WAIT1", OTHER, 40002, 81, sk),
        (4, "S", 8, "FIN_WAIT1", "FIN_WAIT2", 0, 40002, 81, sk),
        (5, "S", 8, "FIN_WAIT2", "CLOSE", 0, 40002, 81, sk),
        (5.1, "D", 8, sk),
    ])
    a, b = closed
    assert (a.conn_id, a.owner_pid, a.rport, a.lport) == (7, CLIENT, 80, 40000)
    assert (b.conn_id, b.owner_pid, b.rport, b.lport) == (8, OTHER, 81, 40002)
    assert a.skaddr == b.skaddr


def test_reconnect_on_same_socket_is_a_new_connection():
    sk = {"skaddr": 0xABC}
    closed, still_open, _, _ = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80, sk),
        (1, "RR", 1, sk),
        (1.01, "S", 1, "SYN_SENT", "CLOSE", CLIENT, 40000, 80, sk),
        (1.02, "E", 1, 111, 40000, 80, sk),
        (100, "S", 2, "CLOSE", "SYN_SENT", CLIENT, 40000, 80, sk),
    ])
    assert only(closed).end_reason == "refused"
    assert [lc.conn_id for lc in still_open] == [2]


def test_connection_born_before_the_trace():
    closed, _, _, _ = run([
        (0, "S", 3, "ESTABLISHED", "FIN_WAIT1", CLIENT, 40000, 80, {"unseen": True}),
        (1, "S", 3, "FIN_WAIT1", "FIN_WAIT2", 0, 40000, 80),
        (2, "S", 3, "FIN_WAIT2", "CLOSE", 0, 40000, 80),
    ])
    lc = only(closed)
    assert not lc.birth_seen and lc.duration_ns is None
    assert S.ESTABLISHED not in lc.state_ns  # unknown, not 0
    assert lc.state_ns == {S.FIN_WAIT1: 1_000_000, S.FIN_WAIT2: 1_000_000}
    assert (lc.owner_pid, lc.owner_source) == (CLIENT, "close")


def test_missed_event_marks_lifecycle_incomplete():
    closed, _, _, t = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "S", 1, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80),
        (5, "S", 1, "FIN_WAIT2", "CLOSE", 0, 40000, 80),  # FIN_WAIT1 steps lost
    ])
    lc = only(closed)
    assert lc.incomplete and t.counters.sequence_gaps == 1
    assert S.FIN_WAIT2 not in lc.state_ns  # no invented duration


def test_open_table_cap_evicts_and_counts():
    closed, still_open, _, t = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "S", 2, "CLOSE", "SYN_SENT", CLIENT, 0, 81),
        (2, "S", 3, "CLOSE", "SYN_SENT", CLIENT, 0, 82),
    ], max_open=2)
    assert t.counters.evicted == 1
    assert sorted(lc.conn_id for lc in still_open) == [2, 3]


def test_filters_pid_matches_listener_children_and_lport():
    rows = [
        (0, "S", 1, "CLOSE", "LISTEN", SERVER, 8080, 0),
        (1, "S", 2, "LISTEN", "SYN_RECV", CLIENT, 8080, 5555),
        (1.1, "S", 2, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5555),
        (1.2, "S", 2, "ESTABLISHED", "CLOSE", CLIENT, 8080, 5555),
        (2, "S", 3, "CLOSE", "SYN_SENT", CLIENT, 0, 8080),
        (2.1, "S", 3, "SYN_SENT", "ESTABLISHED", CLIENT, 5555, 8080),
        (2.2, "S", 3, "ESTABLISHED", "CLOSE", CLIENT, 5555, 8080),
        (3, "S", 1, "LISTEN", "CLOSE", SERVER, 8080, 0),
    ]
    by_pid, _, trans, t = run(rows, Filters(pids=(SERVER,)))
    assert sorted(lc.conn_id for lc in by_pid) == [1, 2]
    assert {tr.lc.conn_id for tr in trans} == {1, 2}
    by_lport, _, _, _ = run(rows, Filters(lports=(5555,)))
    assert [lc.conn_id for lc in by_lport] == [3]
    by_rport, _, _, _ = run(rows, Filters(rports=(8080,)))
    assert [lc.conn_id for lc in by_rport] == [3]   # listeners have no remote port
    v6, _, _, _ = run(rows, Filters(family=6))
    assert v6 == []


def test_kernel_filtered_marker_drops_connection():
    closed, still_open, _, t = run([
        (0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 0, 80),
        (1, "F", 1),
    ])
    assert closed == [] and still_open == [] and t.counters.filtered == 1


def test_first_read_that_is_eof_gives_owner_and_eof_in_one_event():
    closed, _, _, _ = run([
        (0.0, "S", 2, "LISTEN", "SYN_RECV", CLIENT, 8080, 5555),
        (0.1, "S", 2, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5555),
        (1.0, "S", 2, "ESTABLISHED", "CLOSE_WAIT", CLIENT, 8080, 5555),
        (1.5, "IO", 2, WORKER, "eof"),
        (2.0, "S", 2, "CLOSE_WAIT", "LAST_ACK", WORKER, 8080, 5555),
        (2.1, "S", 2, "LAST_ACK", "CLOSE", CLIENT, 8080, 5555),
    ])
    lc = only(closed)
    assert (lc.owner_pid, lc.owner_source, lc.eof_ns) == (WORKER, "io", 1_500_000)


@pytest.mark.parametrize("rows,want", [
    # the kernel gave up on the SYN; the application, woken on another CPU, read the error
    # before the tracepoint did (it then reports 0)
    ([(3070.01, "E", 1, 0, 40000, 80)], ("timeout", 110, "connect timeout (SYN retries exhausted)")),
    ([(3069.9, "RR", 1), (3070.01, "E", 1, 0, 40000, 80)], ("refused", 111, "ECONNREFUSED")),
    ([(3070.01, "E", 1, 113, 40000, 80)], ("timeout", 113, "connect failed: destination unreachable "
                                                       "(an ICMP error; errno says which)")),
    # the application gave up waiting for the connect (poll, select, SO_SNDTIMEO) and closed
    ([], ("timeout", None, "connect abandoned: the application closed it in SYN_SENT before any answer "
                           "(its own connect timeout); the kernel reported no error")),
])
def test_connect_failures_however_the_application_waited(rows, want):
    closed, _, _, _ = run([(0, "S", 1, "CLOSE", "SYN_SENT", CLIENT, 40000, 80),
                           (3070, "S", 1, "SYN_SENT", "CLOSE", CLIENT, 40000, 80), *rows])
    lc = only(closed)
    assert (lc.end_reason, lc.errno, lc.end_detail) == want


def test_end_rules_agree_on_scalars_and_columns():
    """The one table, run both ways (live: one connection; offline: columns), on every
    combination of what the rules read."""
    import itertools

    import numpy as np

    from tcplife_trace.analysis import end_rules as er
    combos = list(itertools.product([False, True], [False, True], [0, *range(1, 12)], [False, True],
                                    [-1, 0, 32, 104, 110, 111, 113], [False, True], [-1, 11, 14, 15]))
    cols = er.Ends(*(np.array(c) for c in zip(*combos)))
    rule, detail, names, errno = er.classify_columns(cols)
    for i, combo in enumerate(combos):
        reason, text, shown = er.classify(er.Ends(*combo))
        assert (reason, text, shown) == (er.REASON_OF_RULE[rule[i]], names[detail[i]] if detail[i] >= 0 else None,
                                         None if errno[i] < 0 else int(errno[i])), combo


def test_map_full_connections_end_at_their_close_with_their_roles():
    """No generation (the kernel map was full): named by address, each birth a new
    connection; a closed one waiting for its trailing events is not lost when its address
    is born again; one that gets an entry mid-life goes on under its generation."""
    a, b = {"skaddr": 0xA1}, {"skaddr": 0xB1}
    closed, still_open, _, t = run([
        (0, "S", 0, "CLOSE", "SYN_SENT", CLIENT, 0, 80, a),
        (1, "S", 0, "SYN_SENT", "ESTABLISHED", CLIENT, 40000, 80, a),
        (2, "S", 0, "ESTABLISHED", "FIN_WAIT1", CLIENT, 40000, 80, a),
        (3, "S", 0, "FIN_WAIT1", "FIN_WAIT2", OTHER, 40000, 80, a),
        (4, "S", 0, "FIN_WAIT2", "CLOSE", OTHER, 40000, 80, a),
        (4.001, "S", 0, "CLOSE", "SYN_SENT", CLIENT, 0, 81, a),         # born again at once
        (4.5, "S", 0, "SYN_SENT", "CLOSE", CLIENT, 40001, 81, a),
        (4.6, "E", 0, 111, 40001, 81),                                   # joined on ports
        (5, "S", 0, "LISTEN", "SYN_RECV", CLIENT, 8080, 5555, b),
        (5.1, "S", 0, "SYN_RECV", "ESTABLISHED", CLIENT, 8080, 5555, b),
        (6, "IO", 9, WORKER, {**b, "unseen": True}),                     # the map had room again
        (7, "S", 9, "ESTABLISHED", "CLOSE_WAIT", CLIENT, 8080, 5555, b),
        (8, "S", 9, "CLOSE_WAIT", "LAST_ACK", WORKER, 8080, 5555, b),
        (8.1, "S", 9, "LAST_ACK", "CLOSE", CLIENT, 8080, 5555, b),
    ])
    assert not still_open and t.counters.unmatched_errors == 0
    first, second, third = sorted(closed, key=lambda lc: lc.start_ns)
    assert (first.role, first.end_reason, first.time_wait) == ("active", "active_close", True)
    assert (second.role, second.end_reason, second.errno) == ("active", "refused", 111)
    assert first.conn_id != second.conn_id and min(first.conn_id, second.conn_id) > 2**63
    assert (third.conn_id, third.role, third.end_reason, third.owner_pid) == (9, "passive", "passive_close", WORKER)
    assert names(third) == ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert sum(third.state_ns.values()) == third.duration_ns == 3_100_000
    assert t.counters.connections == 3


def test_a_socket_that_never_changed_state_is_not_a_connection():
    """send() on a socket never connected, then close(): I/O and a destroy, no transition."""
    closed, still_open, _, t = run([(0, "IO", 5, CLIENT, {"unseen": True}), (1, "D", 5)])
    assert closed == [] and still_open == [] and t.counters.connections == 0
