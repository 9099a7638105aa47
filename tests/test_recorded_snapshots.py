"""sock_diag snapshots in a recording: written between the events, read back as a frame, used
by the findings of the recording (sockets born before it, counters, listeners that appeared)."""
import pandas as pd

from tcplife_trace import load, recording
from tcplife_trace.analysis import evidence
from tcplife_trace.recording import RecordingWriter

from synthetic import stream
from test_offline_equivalence import ROWS

NS = 4026531833
MONO_TO_WALL = 1_800_000_000_000_000_000


def socks(*rows):
    """rows: (state, lport, rport, pid, age_s)"""
    return evidence.sockets_frame([dict(netns=NS, state=st, laddr="10.0.0.1", lport=lp, raddr="10.0.0.9" if rp else
                                     "0.0.0.0", rport=rp, inode=1000 + i, timer="off", rqueue=0, wqueue=0,
                                     idle_recv_s=None, idle_sent_s=None, owner_pid=pid, owner_comm=f"p{pid}",
                                     owner_fd=3 + i, age_s=age, age_lower_bound=True, eof_age_s=None)
                                for i, (st, lp, rp, pid, age) in enumerate(rows)])


SEED = socks(("LISTEN", 8080, 0, 200, 100.0), ("CLOSE_WAIT", 8080, 50001, 200, 30.0),
             ("ESTABLISHED", 8080, 50002, 200, 30.0))
LAST = socks(("LISTEN", 8080, 0, 200, 102.0), ("LISTEN", 9090, 0, 300, 1.0),
             ("CLOSE_WAIT", 8080, 50001, 200, 32.0), ("CLOSE_WAIT", 8080, 50003, 200, 6.0))


def _write(path, cut_after_seed=False):
    events = stream(ROWS)
    w = RecordingWriter(str(path), recording.header("none", MONO_TO_WALL))
    w.add_snapshot(1_000_000, True, SEED, {"mibs": {NS: {"ListenOverflows": 10}},
                                            "sysctls": {NS: {"ip_local_port_range": [1024, 65535]}},
                                            "netns_names": {NS: "host"}})
    w.add(events[:10])
    if cut_after_seed:
        w.flush()
        size = path.stat().st_size
    w.add(events[10:])
    w.add_snapshot(90_000_000, False, LAST, {"mibs": {NS: {"ListenOverflows": 25}}})
    w.close({"events_lost": 0})
    if cut_after_seed:
        with open(path, "r+b") as f:
            f.truncate(size + 40)   # cut inside the next batch
    return str(path)


def test_snapshots_round_trip_between_events(tmp_path):
    rec = load(_write(tmp_path / "r.arrow"))
    assert rec.end["snapshots"] == 2 and rec.events.num_rows == len(ROWS)
    sn = rec.snapshots()
    from tcplife_trace.probes.socket_snapshot import EXTRA_COLUMNS
    assert list(sn.columns) == ["time", "complete", *evidence.SOCKET_COLUMNS, *EXTRA_COLUMNS]
    assert sn[list(EXTRA_COLUMNS)].isna().all().all()  # a snapshot frame without them: NA, not 0
    assert len(sn) == len(SEED) + len(LAST)
    first = sn[sn.time == sn.time.min()]
    assert first.time.iloc[0] == pd.Timestamp(MONO_TO_WALL + 1_000_000, unit="ns", tz="UTC")
    assert first.complete.all() and not sn[sn.time == sn.time.max()].complete.any()
    pd.testing.assert_frame_equal(first[list(evidence.SOCKET_COLUMNS)].reset_index(drop=True), SEED,
                                  check_dtype=False, check_categorical=False)  # (keys typed as in lifecycles)
    assert sn.owner_fd.dtype == "Int64" and sn.age_s.dtype == "float64"


def test_findings_use_the_last_snapshot(tmp_path):
    rec = load(_write(tmp_path / "r.arrow"))
    got = rec.leaks()
    kinds = dict(zip(got.kind, got.summary))
    # sockets the trace never saw (born before the recording) are found through the snapshot
    cw = got[got.kind == "close_wait_leak"].iloc[0]
    assert cw["count"] == 2 and cw.owner_pid == 200 and cw.age_lower_bound
    # what changed between the first and the last snapshot: a listener, the overflow counter
    assert got[got.kind == "new_listener"].iloc[0].owner_pid == 300
    assert "ListenOverflows +15" in kinds["listen_overflow"]
    # without snapshots the same events give neither
    plain = load(_write_plain(tmp_path / "p.arrow")).leaks()
    assert not {"close_wait_leak", "listen_overflow"} & set(plain.kind)


def _write_plain(path):
    w = RecordingWriter(str(path), recording.header("none", MONO_TO_WALL))
    w.add(stream(ROWS))
    w.close({"events_lost": 0})
    return str(path)


def test_a_cut_recording_keeps_the_snapshots_before_the_cut(tmp_path):
    rec = load(_write(tmp_path / "r.arrow", cut_after_seed=True))
    assert any("ends early" in w for w in rec.warnings)
    assert rec.snapshots().time.nunique() == 1 and rec.events.num_rows == 10


def test_an_unreadable_snapshot_is_a_warning(tmp_path):
    p = tmp_path / "r.arrow"
    w = RecordingWriter(str(p), recording.header("none", 0))
    w.add(stream(ROWS))
    w._writer.write_batch(recording._batch(w._schema, b""), custom_metadata={
        recording.SNAP_KEY: b"not arrow", recording.SNAP_META_KEY: '{"taken_ns": 5}'})
    w.close()
    rec = load(str(p))
    assert rec.snapshots().empty and any("unreadable socket snapshot" in x for x in rec.warnings)
    assert len(rec.lifecycles()) == 10  # (9: open before the trace, only read and written)


def test_analyze_report_says_what_the_last_snapshot_holds(tmp_path, capsys):
    from tcplife_trace.cli import main
    assert main(["analyze", _write(tmp_path / "r.arrow")]) == 0
    out = capsys.readouterr().out
    assert "socket snapshots: 2; the last (the periodic kind: no ESTABLISHED or TIME_WAIT)" in out
    assert "LISTEN 2, CLOSE_WAIT 2" in out and "close_wait_leak" in out


def test_analyze_exports_the_snapshots(tmp_path, capsys):
    import json
    from tcplife_trace.cli import main
    path = _write(tmp_path / "r.arrow")
    assert main(["analyze", path, "--export", str(tmp_path / "out"), "--format", "json", "-L", "9090"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["state"], r["owner_pid"]) for r in doc["snapshots"]] == [("LISTEN", 300)]  # -L 9090
    sn = pd.read_parquet(tmp_path / "out" / "snapshots.parquet")
    assert len(sn) == 1 and str(sn.time.dtype) == "datetime64[ns, UTC]"
