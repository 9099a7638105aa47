"""Events that took the overflow path are put back in their connection's order."""
import numpy as np

from tcplife_trace.probes.decode import events_array, life_tuples
from tcplife_trace.probes.event_layout import LIFE_DTYPE, EventKind
from tcplife_trace.probes.stream import Batch, OrderedMerge

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
