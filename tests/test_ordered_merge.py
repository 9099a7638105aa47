"""Events that took the overflow path are put back in their connection's order."""
from collections import Counter

import numpy as np

from tcplife_trace.analysis.closes import FoldedCloses
from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.analysis.summary import StateTimes
from tcplife_trace.probes.decode import events_array, life_tuples
from tcplife_trace.probes.event_layout import LIFE_DTYPE, EventKind, Flag
from tcplife_trace.probes.stream import Batch, OrderedMerge
from tcplife_trace.probes.tcp_states import TcpState as S

from synthetic import ev


class Merge(OrderedMerge):
    """OrderedMerge fed and read as `Ev` tuples, to write the cases plainly."""

    def add_ring(self, events, lives=None):
        super().add_ring(events_array(events), *(() if lives is None else (lives,)))

    def add_spilled(self, events, lives=None):
        super().add_spilled(events_array(events), *(() if lives is None else (lives,)))

    def release(self, progress, final=False):
        return super().release(progress, final).tuples()


def rec(ms, gen, seq, old="ESTABLISHED", new="FIN_WAIT1"):
    return ev(ms, "S", gen, old, new, 1, 1000, 80)._replace(seq=seq)


def ids(events):
    return [(e[2], e[20]) for e in events]


def test_spilled_event_waits_for_the_ring_and_goes_before_its_successor():
    m = Merge(holdback_ns=0)
    m.add_spilled([rec(5, 1, 1)])            # arrives before the ring has got that far
    m.add_ring([rec(1, 1, 0), rec(2, 2, 0)])
    assert ids(m.release(progress=3_000_000)) == [(1, 0), (2, 0)]   # the spill waits: ring at 3 ms
    m.add_ring([rec(6, 1, 2), rec(7, 2, 1)])
    assert ids(m.release(progress=8_000_000)) == [(1, 1), (1, 2), (2, 1)]
    assert m.late == 0


def test_holdback_keeps_recent_ring_events_for_a_late_spill():
    m = Merge(holdback_ns=3_000_000)
    m.add_ring([rec(1, 1, 0), rec(9, 1, 2)])
    assert ids(m.release(progress=9_000_000)) == [(1, 0)]
    m.add_spilled([rec(8, 1, 1)])
    assert ids(m.release(progress=9_000_000, final=True)) == [(1, 1), (1, 2)]


def test_seq_wraps_around():
    m = Merge(holdback_ns=0)
    m.add_ring([rec(1, 1, 65534), rec(3, 1, 0)])
    m.add_spilled([rec(2, 1, 65535)])
    assert ids(m.release(progress=3_000_000, final=True)) == [(1, 65534), (1, 65535), (1, 0)]


def test_spill_after_its_connection_moved_on_is_counted():
    m = Merge(holdback_ns=0)
    m.add_ring([rec(1, 1, 0), rec(3, 1, 2)])
    m.release(progress=3_000_000, final=True)
    m.add_spilled([rec(2, 1, 1)])
    assert ids(m.release(progress=4_000_000)) == [(1, 1)]
    assert m.late == 1


def test_a_backlog_with_a_burst_of_spills_keeps_every_connection_in_order():
    # a consumer that fell behind: a whole ring of events at once, a tenth of them spilled
    import random
    rng = random.Random(7)
    events = [rec(i * 0.001, 1 + i % 3000, i // 3000) for i in range(60_000)]
    spilled = set(rng.sample(range(len(events)), 6_000))
    m = Merge(holdback_ns=0)
    m.add_spilled([events[i] for i in sorted(spilled, key=lambda _: rng.random())])  # per-CPU disorder
    m.add_ring([e for i, e in enumerate(events) if i not in spilled])
    out = m.release(progress=10**12, final=True)
    assert len(out) == len(events) and m.late == 0
    last = {}
    for gen, seq in ids(out):
        assert last.get(gen, -1) < seq
        last[gen] = seq


def life(ms, gen):
    rec = np.zeros(1, dtype=LIFE_DTYPE)
    rec["ev"]["ts_ns"], rec["ev"]["gen"], rec["ev"]["kind"] = int(ms * 1e6), gen, int(EventKind.LIFE)
    return rec


def test_life_records_leave_with_the_events_of_their_time_after_them():
    m = Merge(holdback_ns=3_000_000)
    m.add_ring([rec(1, 1, 0), rec(5, 1, 1), rec(9, 2, 0)], np.concatenate((life(5, 1), life(8, 3)), dtype=LIFE_DTYPE))
    out = m.release(progress=9_000_000)          # cut at 6 ms: the record of 5 ms, after its event
    assert [(e[2], e[13]) for e in out] == [(1, 1), (1, 1), (1, int(EventKind.LIFE))]
    out = m.release(progress=9_000_000, final=True)
    assert [(e[2], e[13]) for e in out] == [(3, int(EventKind.LIFE)), (2, 1)]


def test_batch_columns_and_tuples_agree():
    evs = [rec(1, 1, 0), rec(2, 2, 0)]
    b = Batch(events_array(evs), life(3, 7))
    assert len(b) == 3 and b.events["gen"].tolist() == [1, 2]
    t = b.tuples()
    assert [tuple(x) for x in t[:2]] == [tuple(e) for e in evs]
    assert t[2] == life_tuples(b.lives)[0] and t[2][2] == 7


def test_the_lives_ring_being_further_on_never_releases_events_still_in_the_events_ring():
    # the events ring read up to 1.0 s (a max_batch cut), the lives ring up to 1.5 s; conn 7's
    # seq 5 took the overflow path, its seq 4 is still unread in the events ring
    m = Merge(holdback_ns=20_000_000)
    m.add_ring([rec(1000, 1, 0)])
    m.add_ring([], life(1500, 9))
    assert m.progress() == 1_000_000_000 and m.lives_ts == 1_500_000_000
    m.add_spilled([rec(1200, 7, 5)])
    assert m.release(m.progress()) == []          # the spill waits for the events ring
    m.add_ring([rec(1100, 7, 4)])
    out = m.release(m.progress(), final=True)
    assert ids([e for e in out if e[13] != int(EventKind.LIFE)]) == [(1, 0), (7, 4), (7, 5)]
    assert m.late == 0


def test_a_life_record_waits_for_the_events_of_its_time():
    # lives read further than events: the LIFE of 1.5 s stays until the events ring gets there
    m = Merge(holdback_ns=0)
    m.add_ring([rec(1000, 1, 0)], life(1500, 1))
    out = m.release(m.progress())
    assert [(e[2], e[13]) for e in out] == []          # cut at 1.0 s: nothing before it
    m.add_ring([rec(1500, 1, 1), rec(1600, 2, 0)])
    out = m.release(m.progress())                      # cut at 1.6 s: the first chunk, whole
    assert [(e[2], e[13]) for e in out] == [(1, 1)]     # (the LIFE waits: the CLOSE is still held)
    out = m.release(m.progress())                      # then the second's prefix: the CLOSE, its LIFE
    assert [(e[2], e[13]) for e in out] == [(1, 1), (1, int(EventKind.LIFE))]


def test_batch_tuples_place_a_life_after_every_event_of_its_time_even_out_of_order():
    # a spilled event merged back (or another CPU's) may be older than the ones before it:
    # conn 3's LIFE (4 ms) still goes after its CLOSE (4 ms, after events of 5 ms), before 6 ms
    evs = [rec(1, 1, 0), rec(5, 2, 0), rec(5, 2, 1), rec(5, 2, 2), rec(3, 1, 1), rec(4, 3, 0), rec(6, 2, 3)]
    t = Batch(events_array(evs), life(4, 3)).tuples()
    assert [(e[2], e[13]) for e in t] == [(1, 1), (2, 1), (2, 1), (2, 1), (1, 1), (3, 1),
                                          (3, int(EventKind.LIFE)), (2, 1)]


# A connect timeout: the kernel folds the connection (LIFE at its CLOSE) and sends the errno
# report right after it, as an event of the same generation
TIMED_OUT = 110  # ETIMEDOUT


def timed_out_life(ms, gen, sport=40000, dport=80):
    r = life(ms, gen)
    e, a = r["ev"], r["agg"]
    e["skaddr"], e["sport"], e["dport"], e["family"] = 0xFFFF0000 + gen, sport, dport, 2
    e["oldstate"], e["newstate"] = int(S.SYN_SENT), int(S.CLOSE)
    e["netns"], e["flags"] = 4026531833, int(Flag.NETNS | Flag.UID)
    a["start_ns"], a["enter_ns"], a["last_ns"] = int((ms - 1) * 1e6), int((ms - 1) * 1e6), int(ms * 1e6)
    a["path"][0, :3], a["path_len"] = [int(S.CLOSE), int(S.SYN_SENT), int(S.CLOSE)], 3
    a["state_mask"], a["state_ns"][0, int(S.SYN_SENT)] = 1 << int(S.SYN_SENT), 1_000_000
    a["owner_src"], a["owner_pid"], a["owner_comm"] = 0, 42, b"curl"
    return r


def errno_report(ms, gen, sport=40000, dport=80):
    e = ev(ms, "E", gen, TIMED_OUT, sport, dport)
    return e._replace(flags=e.flags | int(Flag.AGG))


def ended(batches):
    """What a Tracker makes of the batches' tuples, in order: (end_reason, detail, errno) per connection."""
    closed = []
    t = Tracker(on_close=closed.append)
    for b in batches:
        t.feed_all(b)
    t.finish()
    return {lc.conn_id: (lc.end_reason, lc.end_detail, lc.errno) for lc in closed}, t.counters.unmatched_errors


def kinds(events):
    return [(e[2], e[13]) for e in events]


def test_an_errno_report_never_leaves_before_its_connections_life_record():
    # conn 5 times out at 10 ms (LIFE), its errno report at 10.1 ms is read in one ring chunk;
    # another CPU's older event (conn 7, 9 ms) reached the ring after it, in the next chunk,
    # which is held across the cut: the LIFE of conn 5 must not wait for conn 7's event
    m = Merge(holdback_ns=20_000_000)
    m.add_ring([errno_report(10.1, 5)], timed_out_life(10, 5))
    m.add_ring([rec(9, 7, 0), rec(40, 7, 1)])
    first = m.release(progress=40_000_000)             # cut at 20 ms
    rest = m.release(progress=40_000_000, final=True)
    order = kinds(first + rest)
    assert order.index((5, int(EventKind.LIFE))) < order.index((5, int(EventKind.ERROR)))
    assert (5, int(EventKind.LIFE)) in kinds(first)    # with its errno report, not a batch later
    ends, unmatched = ended([first, rest])
    assert ends[5] == ("timeout", "connect timeout (SYN retries exhausted)", TIMED_OUT) and unmatched == 0


def test_a_life_record_still_waits_for_its_own_connections_held_events():
    # conn 5's own CLOSE (10 ms) is held in a chunk across the cut: its LIFE waits for it
    m = Merge(holdback_ns=20_000_000)
    m.add_ring([rec(1, 8, 0)], timed_out_life(10, 5))
    m.add_ring([rec(10, 5, 3, "SYN_SENT", "CLOSE"), rec(40, 7, 1)])
    assert kinds(m.release(progress=40_000_000)) == [(8, 1)]
    out = m.release(progress=70_000_000)
    assert kinds(out) == [(5, 1), (5, int(EventKind.LIFE)), (7, 1)]


def test_batch_tuples_place_a_life_before_its_own_later_events_whatever_other_connections_do():
    # the errno report of conn 5 (10.1 ms) came before conn 7's older event (9 ms) in ring order:
    # conn 5's LIFE (10 ms) goes before its errno report, not after every event of its time
    evs = [rec(1, 8, 0), errno_report(10.1, 5), rec(9, 7, 0), rec(12, 8, 1)]
    t = Batch(events_array(evs), timed_out_life(10, 5)).tuples()
    assert kinds(t) == [(8, 1), (5, int(EventKind.LIFE)), (5, int(EventKind.ERROR)), (7, 1), (8, 1)]
    ends, unmatched = ended([t])
    assert ends[5] == ("timeout", "connect timeout (SYN retries exhausted)", TIMED_OUT) and unmatched == 0


def test_folded_closes_join_the_errno_report_across_a_held_back_cut():
    # the same interleaving through the columns path (analysis/closes.py FoldedCloses): the
    # record followed by its errno report goes to the tracker, which joins them
    closed = []
    t = Tracker(on_close=closed.append)
    reasons = Counter()
    fc = FoldedCloses(t, StateTimes(), reasons, lambda: [])
    m = OrderedMerge(holdback_ns=20_000_000)
    m.add_ring(events_array([errno_report(10.1, 5)]), timed_out_life(10, 5))
    m.add_ring(events_array([rec(9, 7, 0), rec(40, 7, 1)]))
    for b in (m.release(40_000_000), m.release(40_000_000, final=True)):
        t.feed_all(fc.route(b.events, b.lives))
    fc.finish()
    t.finish()
    assert [(lc.conn_id, lc.end_reason, lc.errno) for lc in closed if lc.conn_id == 5] == [(5, "timeout", TIMED_OUT)]
    assert t.counters.unmatched_errors == 0


def test_a_later_event_of_a_connection_whose_life_record_waits_waits_with_it():
    # conn 5's errno report (11 ms) reached the ring before its own CLOSE (10 ms, another CPU),
    # which is held across the cut with its LIFE: the report waits too, and leaves after the LIFE
    m = Merge(holdback_ns=20_000_000)
    m.add_ring([errno_report(11, 5)], timed_out_life(10, 5))
    m.add_ring([rec(10, 5, 3, "SYN_SENT", "CLOSE"), rec(40, 7, 1)])
    assert m.release(progress=40_000_000) == []
    out = m.release(progress=70_000_000)
    assert kinds(out)[:2] == [(5, int(EventKind.LIFE)), (5, int(EventKind.ERROR))]


def test_an_errno_report_without_a_generation_goes_after_the_life_record_with_its_ports():
    # the kernel could not tie the report to its socket (gen 0): the Tracker joins it by ports
    evs = [errno_report(10.1, 0), rec(9, 7, 0)]
    t = Batch(events_array(evs), timed_out_life(10, 5)).tuples()
    assert kinds(t) == [(5, int(EventKind.LIFE)), (0, int(EventKind.ERROR)), (7, 1)]
    ends, unmatched = ended([t])
    assert ends[5] == ("timeout", "connect timeout (SYN retries exhausted)", TIMED_OUT) and unmatched == 0
