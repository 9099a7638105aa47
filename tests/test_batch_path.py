"""The batch path against the reference rules, field by field, on a real mixed workload.

- Metrics counted from each batch's columns (Metrics.on_batch: the kernel's dur_ns, roles,
  births) equal the ones counted one Transition object at a time by the Python state machine
  (Metrics.on_transition), fed by the same session with the same events.
- A stream session that wants no transition as an object (LiveSession.folds_only: the tracker
  follows the kernel's folds and the few events it does not fold) ends every connection of
  the workload exactly as a session that follows every event, traced at the same time.
"""
import subprocess
import sys
import time

import numpy as np
import pytest
from test_kernel_aggregation import FIELDS, ROUND, WORKLOAD

from tcplife_trace.live import LiveSession
from tcplife_trace.metrics import Metrics
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.event_layout import EVENT_DTYPE

pytestmark = pytest.mark.privileged


def _run(sessions, rounds: int, workers: int) -> None:
    p = subprocess.Popen([sys.executable, WORKLOAD, str(rounds), str(workers)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        for s in sessions:
            s.poll(20)
    out = p.communicate(timeout=5)[0].strip()
    assert out == "DONE", out
    for _ in range(4):
        for s in sessions:
            s.poll(30)


def test_metrics_from_columns_equal_the_per_transition_ones():
    """(The events read during the start-up check are tuples, without the kernel's fold: the
    columns count their transitions but not their time in state, see LiveSession._take_early
    and the README on --record. On a host where other processes make connections meanwhile
    there are some: the per-transition reference leaves their durations out too.)"""
    columns, objects, timed = Metrics(), Metrics(), Metrics()
    early = set()  # (skaddr, ts_ns, old, new) of the start-up window's transitions

    def per_transition(t):
        objects.on_transition(t)
        if (t.lc.skaddr, t.ts_ns, t.oldstate, t.newstate) not in early:
            timed.on_transition(t)
    s = LiveSession(prog.Settings(), on_batch=columns.on_batch, on_transition=per_transition)
    take_early = s._take_early

    def spy_early():
        out = take_early()
        early.update((e[1], e[0], e[14], e[15]) for e in out if e[13] == 1)  # (STATE)
        return out
    s._take_early = spy_early
    assert not s.folds_only
    try:
        _run([s], rounds=4, workers=2)
    finally:
        report = s.stop()
    assert report["events_lost"] == 0 or any((report["recursion_misses"] or {}).values())  # (a skipped run is the same to both)
    assert sum(objects.transitions.values()) >= 4 * sum(ROUND.values()) * 4 * 2  # the workload's, at the least
    assert columns.transitions == objects.transitions
    assert columns.opened == objects.opened
    assert columns.hist == timed.hist  # every bucket of every state, and the sums
    assert set(objects.hist) >= {1, 2, 3, 4, 5, 8, 9}  # ESTABLISHED ... LAST_ACK: durations were compared
    with pytest.raises(ValueError):
        Metrics(labels=("port",)).on_batch(np.zeros(0, EVENT_DTYPE))  # labels need the lifecycles


def _key(lc):
    return (lc.family, lc.laddr, lc.lport, lc.raddr, lc.rport, lc.role)


def test_folds_only_session_ends_connections_as_the_per_event_one():
    per_event, folds = [], []
    a = LiveSession(prog.Settings(), on_close=per_event.append, on_transition=lambda t: None)
    b = LiveSession(prog.Settings(), on_close=folds.append)  # no transition wanted: folds only
    assert b.folds_only and not a.folds_only
    checks = set(a._own_ports) | set(b._own_ports)  # each one's start-up check, seen by the other
    try:
        _run([a, b], rounds=4, workers=2)
    finally:
        ra, rb = a.stop(), b.stop()
    lost = ra["events_lost"] + rb["events_lost"]
    if lost:
        assert ra["recursion_misses"] or rb["recursion_misses"], (ra["events_lost"], rb["events_lost"])
    # each traces the other's start-up check connection once at most: compare by tuple; keys
    # seen twice (a port reused within the run) are left out on both sides
    def by_key(lcs):
        out, dup = {}, set()
        for lc in lcs:
            k = _key(lc)
            if k in out:
                dup.add(k)
            out[k] = lc
        return {k: v for k, v in out.items() if k not in dup and k[2] not in checks and k[4] not in checks}
    A, B = by_key(per_event), by_key(folds)
    # one connection in both: the same tuple born at the same time (each program's clock
    # reading a few us apart). Another process's tuple may come up once in each session's
    # window (the sessions start and stop a moment apart) and be two connections
    common = {k for k in set(A) & set(B) if abs(A[k].start_ns - B[k].start_ns) < 1_000_000}
    assert len(common) >= 0.9 * sum(ROUND.values()) * 4 * 2  # the workload's connection ends, both views
    # each program has its own generations and takes its own clock readings (a few hundred ns
    # apart): the times are compared within one program in test_kernel_aggregation (mode
    # "both"); here which states were timed, in which order, and everything else
    times = {"start_ns", "end_ns", "state_enter_ns", "last_ns", "eof_ns", "state_ns"}
    skip = {"conn_id"} | times
    diffs = {}
    for k in common:
        d = {f: (getattr(A[k], f), getattr(B[k], f)) for f in FIELDS
             if f not in skip and getattr(A[k], f) != getattr(B[k], f)}
        if list(A[k].state_ns) != list(B[k].state_ns):
            d["states timed"] = (list(A[k].state_ns), list(B[k].state_ns))
        if (A[k].eof_ns is None) != (B[k].eof_ns is None):
            d["eof seen"] = (A[k].eof_ns, B[k].eof_ns)
        if d:
            diffs[k] = d
    # Two programs: a probe run the kernel skips (a recursion miss: a BPF program, the other
    # session's say, already running on that CPU when a softirq changes a socket's state) is
    # skipped in one of them only, and the connection it belonged to differs (an errno report
    # missed, say). Each lost event makes one connection differ at most; none lost, none may.
    assert len(diffs) <= lost, \
        f"{len(diffs)} of {len(common)} differ ({lost} events lost: " \
        f"{ra['events_lost_by_kind']}, {rb['events_lost_by_kind']}), e.g. {next(iter(diffs.items()))}"
    ends = {lc.end_reason for k, lc in A.items() if k in common}
    assert ends >= {"active_close", "passive_close", "local_abort", "reset_by_peer", "refused"}


def test_own_rows_answer_as_is_own_row_for_row():
    """The start-up check's records are left out of a batch's columns by the rule that leaves
    them out of the tuples (offset_check.is_own), row for row."""
    from tcplife_trace.probes import offset_check
    from tcplife_trace.probes.decode import event_tuples
    ev = np.zeros(5000, EVENT_DTYPE)
    rng = np.random.default_rng(1)
    ev["sport"] = rng.choice([0, 100, 200, 300, 5], 5000)
    ev["dport"] = rng.choice([0, 100, 200, 7], 5000)
    ev["gen"] = rng.choice([0, 1, 2, 3], 5000)
    for ports, gens in (({100, 200}, set()), ({100, 200}, {1, 3}), ({300}, {2})):
        cols = offset_check.own_rows(ev, ports, gens)
        rows = [offset_check.is_own(t, ports, gens) for t in event_tuples(ev)]
        assert cols.tolist() == rows and 0 < cols.sum() < len(ev)


def spy_taken(s: LiveSession) -> list:
    """What the session takes, in order, as it runs: the start-up window's records (a list of
    tuples, to the tracker) and each batch as the session had it (the start-up check's own
    records left out)."""
    from tcplife_trace.probes.stream import Batch
    taken = []
    take_early, take_batch = s._take_early, s._take_batch

    def early():
        out = take_early()
        taken.append(list(out))
        return out

    def batch(b, recorded=False):
        taken.append(Batch(b.events.copy(), b.lives.copy()))
        return take_batch(b, recorded)
    s._take_early, s._take_batch = early, batch
    return taken


def test_folds_counted_as_columns_equal_the_trackers_lifecycles():
    """A session that wants no Lifecycle object counts the kernel's folded records as columns
    (analysis/closes.FoldedCloses). The same batches from the same program, fed to the Python
    Tracker, give the same end reasons, the same time-in-state samples, the same counters and
    the same counts in the close watchers (serve's metrics, the detectors' endings), field by
    field; the records followed by an event (errno reports after a refused connect, resets)
    went to the tracker, the others were counted as columns."""
    from collections import Counter

    from tcplife_trace.analysis.lifecycle import Tracker
    from tcplife_trace.analysis.summary import StateTimes
    from tcplife_trace.diagnosis import Watch
    from tcplife_trace.probes.event_layout import Flag
    from tcplife_trace.probes.stream import Batch

    metrics, watch = Metrics(), Watch()
    s = LiveSession(prog.Settings())
    assert s.folds_only and s.closes is not None
    s.close_watchers += [metrics.on_close, watch.closed]
    s.column_watchers.update({metrics.on_close: metrics.closed_columns, watch.closed: watch.closed_columns})
    taken = spy_taken(s)
    try:
        _run([s], rounds=4, workers=2)
    finally:
        report = s.stop()
    assert s.closes.counted >= sum(ROUND.values()) * 4 * 2 * 0.5  # most were counted as columns
    assert s.closes.handed > 0  # and some went to the tracker (errno reports follow refused connects)

    # the reference: the Python Tracker on the same records
    ref_metrics, ref_watch = Metrics(), Watch()
    ref_times, ref_ends = StateTimes(), Counter()

    def closed(lc):
        ref_ends[lc.end_reason] += 1
        ref_metrics.on_close(lc)
        ref_watch.closed(lc)
    ref = Tracker(on_close=closed, on_state_time=ref_times.add)
    for t in taken:
        if isinstance(t, list):
            ref.feed_all(t)
            continue
        ev = t.events[(t.events["flags"] & int(Flag.AGG)) != 0]
        ref.feed_all(Batch(ev, t.lives).tuples(True))
    ref.finish()
    assert dict(s.end_reasons) == dict(ref_ends)
    assert set(ref_ends) >= {"active_close", "passive_close", "local_abort", "reset_by_peer", "refused"}
    ours, theirs = s.tracker.counters, ref.counters
    for f in ("connections", "closed", "sequence_gaps", "unmatched_errors", "filtered"):
        assert getattr(ours, f) == getattr(theirs, f), f
    assert report["closed"] == theirs.closed
    # every time-in-state sample, state by state (the exact samples: order apart)
    assert set(s.state_times._exact) == set(ref_times._exact)
    for st, samples in ref_times._exact.items():
        assert sorted(s.state_times._exact[st]) == sorted(samples), st
    assert s.state_times.table() == ref_times.table()
    assert metrics.closed == ref_metrics.closed and sum(metrics.closed.values()) == theirs.closed
    # the fold's health and retransmits at each end: serve's RTT histogram and retransmit counter
    assert set(metrics.rtt_hist) == set(ref_metrics.rtt_hist) == {()}
    ours_rtt, ref_rtt = metrics.rtt_hist[()], ref_metrics.rtt_hist[()]
    assert ours_rtt[:-1] == ref_rtt[:-1] and ours_rtt[-1] == pytest.approx(ref_rtt[-1])
    assert sum(ours_rtt[:-1]) >= 0.5 * theirs.closed and ours_rtt[-1] > 0  # most ends had an RTT
    assert metrics.retransmits == ref_metrics.retransmits
    assert watch.ended == ref_watch.ended and watch.owner_at == ref_watch.owner_at
    assert sum(sum(c.values()) for c in watch.ended.values()) > 0
