"""The frames of a recording do not depend on how it is cut into batches, and the shortcuts
taken for speed (one shared sort by connection, values gathered from the memory-mapped
batches, path keys packed 4 bits a state, quantiles partitioned in place) give what the
plain computation gives."""
import numpy as np
import pandas as pd

from tcplife_trace import load, recording
from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.frames.connections import state_durations, summary
from tcplife_trace.frames.columns import STATE_CATEGORIES
from tcplife_trace.recording import RecordingWriter

from synthetic import stream
from test_offline_equivalence import ROWS

C = 100
RETRIES = [(100 + i, "S", 9, "CLOSE" if i % 2 == 0 else "SYN_SENT", "SYN_SENT" if i % 2 == 0 else "CLOSE",
            C, 0 if i == 0 else 41000, 85) for i in range(21)]   # connect() retried on one socket
EXTRA = RETRIES + [
    (200, "S", 0, "CLOSE", "SYN_SENT", C, 0, 86),                 # no generation: no connection
    (300, "S", 10, "CLOSE", "SYN_SENT", C, 0, 87),                # a connection a filter dropped
    (300.5, "F", 10),
    (301, "S", 10, "SYN_SENT", "ESTABLISHED", C, 41001, 87),
    (400, "S", 11, "CLOSE", "SYN_SENT", C, 0, 443, {"family": 6, "laddr": "::1", "raddr": "2001:db8::5"}),
    (401, "S", 11, "SYN_SENT", "ESTABLISHED", C, 41002, 443, {"family": 6, "laddr": "::1", "raddr": "2001:db8::5"}),
    (402, "S", 12, "CLOSE", "SYN_SENT", C, 0, 80, {"family": 6, "laddr": "::ffff:127.0.0.1",
                                                   "raddr": "::ffff:10.9.8.7"}),   # dual-stack, IPv4 peer
]


def _events():
    """The scenarios, each connection with its own peer address, netns and uid, so that a
    value read for the wrong connection shows."""
    return [e._replace(daddr_raw=bytes([10, 1, 0, e.gen]) + bytes(12) if e.af == 2 else e.daddr_raw,
                       netns_raw=4026531833 + e.gen, uid_raw=1000 + e.gen) for e in stream(ROWS + EXTRA)]


def _write(path, events, per_batch: int) -> str:
    w = RecordingWriter(str(path), recording.header("none", 0))
    for i in range(0, len(events), per_batch):
        w.add(events[i:i + per_batch])
        w.flush()                       # one Arrow batch per slice
    w.close()
    return str(path)


def _frames(rec):
    return {"lifecycles": rec.lifecycles(), "transitions": rec.transitions,
            "state_durations": rec.state_durations(), "summary": rec.summary()}


def test_frames_do_not_depend_on_batches(tmp_path):
    events = _events()
    whole = load(_write(tmp_path / "one.arrow", events, len(events)))
    cut = load(_write(tmp_path / "cut.arrow", events, 3))
    assert whole.events.column(0).num_chunks == 1 and cut.events.column(0).num_chunks > 10
    a, b = _frames(whole), _frames(cut)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


def test_edge_rows_and_long_paths(tmp_path):
    events = _events()
    rec = load(_write(tmp_path / "r.arrow", events, 5))
    lc = rec.lifecycles().set_index("conn_id")
    tr = rec.transitions
    # gen 0 is a transition without a connection; the filtered connection is forgotten
    assert 0 not in lc.index and 10 not in lc.index
    assert (tr.conn_id == 0).sum() == 1 and pd.isna(tr[tr.conn_id == 0].ms_in_old).all()
    assert not (tr.conn_id == 10).any()
    # a path of 22 states (more than a 64-bit key holds) is spelled out in full
    assert lc.loc[9, "path"] == " ".join(["CLOSE", "SYN_SENT"] * 11)
    assert lc.loc[3, "path"] == "CLOSE SYN_SENT ESTABLISHED FIN_WAIT1 FIN_WAIT2 CLOSE"
    assert lc.loc[3, "raddr"] == "10.1.0.3" and lc.loc[3, "netns"] == 4026531836 and lc.loc[3, "uid"] == 1003
    assert (lc.loc[11, "laddr"], lc.loc[11, "raddr"], lc.loc[11, "family"]) == ("::1", "2001:db8::5", 6)
    assert lc.loc[12, "raddr"] == "10.9.8.7" and lc.loc[12, "family"] == 4
    assert set(tr[tr.conn_id == 11].raddr) == {"2001:db8::5"}
    # paths and times in each state agree with the live state machine, repeats summed
    closed = []
    t = Tracker(on_close=closed.append)
    t.feed_all([e for e in events if e.gen not in (0, 10)])
    still = t.finish()
    sd = rec.state_durations()
    for life in closed + still:
        if life.conn_id == 9:
            continue                    # the live tracker starts a lifecycle at each connect()
        assert lc.loc[life.conn_id, "path"] == " ".join(STATE_CATEGORIES[s - 1] for s in life.path)
        got = sd[sd.conn_id == life.conn_id].set_index("state").seconds
        for state, ns in life.state_ns.items():
            assert abs(got[STATE_CATEGORIES[state - 1]] - ns / 1e9) < 1e-9, (life.conn_id, state)
    retried = sd[sd.conn_id == 9].set_index("state").seconds   # ten visits each, one row each
    assert len(retried) == 2 and abs(retried["SYN_SENT"] - 0.010) < 1e-9 and abs(retried["CLOSE"] - 0.010) < 1e-9


def test_state_durations_from_the_sort_equal_those_from_transitions(tmp_path):
    rec = load(_write(tmp_path / "r.arrow", _events(), 4))
    fast = rec.state_durations()
    plain = state_durations(rec.transitions)
    key = ["conn_id", "state"]
    pd.testing.assert_frame_equal(fast.sort_values(key, ignore_index=True), plain.sort_values(key, ignore_index=True))


def test_summary_equals_pandas_quantiles():
    rng = np.random.default_rng(7)
    n = 20_011
    states = rng.choice(["ESTABLISHED", "TIME_WAIT", "SYN_SENT", "CLOSE_WAIT"], size=n, p=[0.6, 0.3, 0.0999, 0.0001])
    sd = pd.DataFrame({"conn_id": pd.array(np.arange(n), dtype="UInt64"),
                       "state": pd.Categorical(states, categories=STATE_CATEGORIES),
                       "seconds": rng.lognormal(size=n)})
    got = summary(sd)
    g = sd.groupby("state", observed=True).seconds
    want = pd.DataFrame({"count": g.size(), "p50_s": g.quantile(0.5), "p90_s": g.quantile(0.9),
                         "p99_s": g.quantile(0.99), "max_s": g.max()})
    want = want.loc[got.index]
    assert list(got.index) == ["ESTABLISHED", "TIME_WAIT", "SYN_SENT", "CLOSE_WAIT"]
    np.testing.assert_allclose(got.to_numpy(dtype=float), want.to_numpy(dtype=float), rtol=1e-12)


def test_groupings_by_peer_port_and_process(tmp_path):
    rec = load(_write(tmp_path / "r.arrow", _events(), 7))
    lc = rec.lifecycles()
    port = rec.by_local_port()
    assert port.loc[8080, "connections"] == (lc.lport == 8080).sum() == 3  # listener, child, born-before
    assert port.connections.sum() == len(lc)  # a connection whose port was never known is a group too
    proc = rec.by_process()
    assert proc.loc[(100, "p100"), "connections"] == (lc.pid == 100).sum()
    peer = rec.by_peer()
    assert list(peer.columns[:4]) == ["connections", "open", "median_s", "max_s"]
    ends = [c for c in peer.columns[4:]]
    assert ends == [c for c in lc.end_reason.cat.categories if c in ends]  # in the vocabulary's order
    assert peer[ends].to_numpy().sum() + peer.open.sum() == peer.connections.sum()
    assert peer.open.sum() == (lc.end_reason == "open").sum() >= 1


def test_groupings_do_not_multiply_categories():
    """Only the groups present: a crosstab over 40k peer addresses x 40k ports asked for 130 GiB."""
    from tcplife_trace.frames.connections import grouped
    n = 40_000
    lc = pd.DataFrame({"raddr": pd.Categorical([f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(n)]),
                       "rport": pd.array(np.arange(n) % 60000 + 1024, dtype="UInt16"),
                       "end_reason": pd.Categorical(["active_close", "open"] * (n // 2)),
                       "duration_s": np.linspace(0, 1, n)})
    g = grouped(lc, ["raddr", "rport"])
    assert len(g) == n and g.connections.sum() == n and g.open.sum() == n // 2
    assert list(g.columns[4:]) == ["active_close"]


def test_empty_frames_have_the_dtypes_of_full_ones(tmp_path):
    """A recording with no snapshots and no findings gives frames of no rows with the same
    dtypes as one with both (leaks() and snapshots() of an empty recording had object and
    int64 columns where a full one has categoricals and nullable integers), and a key column
    has one dtype in every frame that holds it."""
    from test_recorded_snapshots import _write as with_snapshots

    from tcplife_trace.frames import schema as frame_schema
    full = load(with_snapshots(tmp_path / "full.arrow"))
    bare = load(_write(tmp_path / "bare.arrow", stream(ROWS[8:13]), 100))  # one active close: no finding
    got = {}
    for rec in (full, bare):
        lk, sn = rec.leaks(), rec.snapshots()
        got[rec is full] = lk, sn
        for name, df in (("leaks", lk), ("snapshots", sn)):
            assert list(df.columns) == [c for c, _ in frame_schema.columns(name)]
    (lk_full, sn_full), (lk_bare, sn_bare) = got[True], got[False]
    assert len(lk_full) and len(sn_full) and not len(lk_bare) and not len(sn_bare)
    for a, b in ((lk_full, lk_bare), (sn_full, sn_bare)):
        assert {c: str(t) for c, t in a.dtypes.items()} == {c: str(t) for c, t in b.dtypes.items()}
    frames = {"lifecycles": full.lifecycles(), "transitions": full.transitions, "leaks": lk_full,
              "snapshots": sn_full, "state_durations": full.state_durations()}
    for key in ("conn_id", "netns", "laddr", "lport", "raddr", "rport", "owner_pid", "state"):
        seen = {name: str(df[key].dtype) for name, df in frames.items() if key in df}
        assert len(set(seen.values())) == 1, (key, seen)
    assert str(sn_full.lport.dtype) == "UInt16" and str(lk_full.owner_pid.dtype) == "UInt32"
