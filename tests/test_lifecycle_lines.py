"""`--lifecycles`' lines from the folded records' columns (tcplife_trace/render/lifecycle_lines.py)
against TextView.lifecycle on the Lifecycle objects the Python Tracker makes of the same
records, line for line, on a real mixed workload (IPv4 and IPv6, every end reason, TIME_WAIT,
resets), in the plain view, with -w (RTT and retransmits) and with -T -t (the time prefixes)."""
from collections import Counter

import pytest
from test_batch_path import _run, spy_taken

from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.render.lifecycle_lines import ColumnLifecycles, states_shape
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.event_layout import Flag
from tcplife_trace.probes.stream import Batch
from tcplife_trace.render.views import TextView

FLAVOURS = {"plain": {}, "wide": {"wide": True}, "times": {"hms": True, "seconds": True}}


@pytest.mark.privileged
@pytest.mark.parametrize("mode", ["aggregate", "stream"])
def test_column_lines_equal_the_lifecycle_objects_lines(mode):
    s = LiveSession(prog.Settings(mode=mode))
    assert s.closes is not None
    got: dict[str, list[str]] = {k: [] for k in FLAVOURS}
    for name, flags in FLAVOURS.items():
        ColumnLifecycles(lambda text, name=name: got[name].extend(text.split("\n"))).attach(s, **flags)
    taken = spy_taken(s)
    try:
        _run([s], rounds=3, workers=2)
    finally:
        s.stop()
    assert s.closes.counted > 100  # most lines came from the columns

    views = {name: TextView(s.clock, **flags) for name, flags in FLAVOURS.items()}
    want: dict[str, list[str]] = {k: [] for k in FLAVOURS}

    def closed(lc):
        for name, view in views.items():
            want[name].append(view.lifecycle(lc))
    ref = Tracker(on_close=closed)
    for t in taken:
        if isinstance(t, list):
            ref.feed_all(t)
            continue
        ev = t.events[(t.events["flags"] & int(Flag.AGG)) != 0] if mode == "stream" else t.events
        ref.feed_all(Batch(ev, t.lives).tuples(True))
    ref.finish()
    for name in FLAVOURS:
        missing = Counter(want[name]) - Counter(got[name])
        extra = Counter(got[name]) - Counter(want[name])
        assert not missing and not extra, (name, list(missing)[:3], list(extra)[:3])
    ends = {line.split()[9] for line in want["plain"]}
    assert {"active_close+TW", "passive_close", "local_abort", "reset_by_peer", "refused"} <= ends, ends
    assert any("::1" in line for line in want["plain"]) and any("127.0.0.1" in line for line in want["plain"])
    assert any(line.split()[10] != "-" for line in want["wide"])  # RTTs were compared


def test_states_shape_is_states_compact():
    """The STATES cell's shapes are views.states_compact's, on lifecycles of every kind."""
    from tcplife_trace.analysis.lifecycle import Lifecycle
    from tcplife_trace.render.views import states_compact
    for path, birth_seen, tw, timed in [((7, 2, 1, 4, 5, 7), True, True, {2, 1, 4, 5}),
                                        ((10, 3, 1, 8, 9, 7), True, False, {3, 1, 8, 9}),
                                        ((1, 8, 9, 7), False, False, {8, 9}),
                                        ((7, 2, 7), True, False, {2}),
                                        ((1, 4, 1, 4, 7), False, False, {4})]:
        lc = Lifecycle(1, 1, "active", 0, birth_seen)
        lc.path, lc.closed, lc.state, lc.time_wait = list(path), True, path[-1], tw
        lc.state_ns = {st: 1_234_567 * (st + 1) for st in timed}
        pieces, order = states_shape(path, birth_seen, tw, timed)
        text = pieces[0].decode()
        for st, piece in zip(order, pieces[1:]):
            text += "%.3f" % (lc.state_ns[st] / 1e6) + piece.decode()
        assert text == states_compact(lc), path
