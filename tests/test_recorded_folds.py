"""Recordings carry what only the kernel's fold knows of each connection (schema 3: its LIFE
record's cgroup, retransmits and health at the end, in batches of their own; schema 4: each
event's cgroup and the paths of the cgroups they name); the offline lifecycles frame has the
same handshake, health, retransmit and cgroup columns as the live lifecycles, the transitions
frame each change's cgroup, and a recording without them (schema 2) loads with those columns NA."""
from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np
import pandas as pd
import pytest

from tcplife_trace import load, recording
from tcplife_trace.render import views
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import health
from tcplife_trace.probes.event_layout import LIFE_DTYPE
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.recording import RecordingWriter


def _aborted_pairs(n: int) -> tuple[list[int], int]:
    """(the clients' ports, the listener's port) of n loopback connections the client aborted."""
    lsock = socket.create_server(("127.0.0.1", 0))
    sport = lsock.getsockname()[1]
    ports = []
    for _ in range(n):
        c = socket.create_connection(lsock.getsockname())
        a, _ = lsock.accept()
        c.sendall(b"hello")
        a.recv(5)
        a.sendall(b"x" * 3000)
        c.recv(3000, socket.MSG_WAITALL)
        ports.append(c.getsockname()[1])
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        a.close()
    lsock.close()
    return ports, sport


@pytest.mark.privileged
def test_recorded_lifecycles_carry_the_folds_extras(tmp_path):
    path = str(tmp_path / "folds.arrow")
    offset = time.time_ns() - time.monotonic_ns()
    w = RecordingWriter(path, recording.header("none", offset))
    closed = []
    # the session records each batch's LIFE records and joins them to the lifecycles it
    # builds from the events (LiveSession._take_batch), as `tcplife-trace --record` does (here
    # it follows the folds only: no transition is wanted)
    s = LiveSession(recorder=w, on_close=closed.append, wall_offset_ns=offset)
    try:
        ports, sport = _aborted_pairs(5)
        ours = lambda: {lc.conn_id: lc for lc in closed if lc.lport in ports and lc.rport == sport}  # noqa: E731
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(ours()) < 5:
            s.poll(50)
    finally:
        report = s.stop()
        w.close(report)
    live = ours()
    assert len(live) == 5 and w.lives >= 5
    rec = load(path)
    assert rec.header["schema_version"] == recording.SCHEMA_VERSION == 4 and rec.warnings == []
    assert set(live) <= set(rec.lives["conn_id"].to_pylist())
    frame = rec.lifecycles().set_index("conn_id")
    mine = open("/proc/self/cgroup").read().strip().split("::", 1)[1]
    for cid, lc in live.items():
        r = frame.loc[cid]
        want = views.lifecycle_record(lc, s.clock)
        assert lc.health_raw is not None and want["rtt_ms"] is not None
        for c in health.COLUMNS:
            assert (None if pd.isna(r[c]) else r[c]) == want[c], c
        assert r["retransmits"] == lc.retrans == 0 and r["syn_retransmits"] == 0 and r["losses"] == 0
        assert r["cgroup_id"] == lc.cgroup_id and r["cgroup"] == mine
        assert r["handshake_ms"] == pytest.approx(lc.state_ns[S.SYN_SENT] / 1e6) == want["handshake_ms"]
        assert r["data_segs_out"] == 1 and r["data_segs_in"] == 1  # (its hello and the 3000 bytes back)
    # each transition carries its connection's home after it (schema 4): the client's from its
    # SYN_SENT on (connect() took the owner), the accepted peer's from SYN_RECV on (its listener's)
    tr = rec.transitions
    client = tr[tr["conn_id"].isin(list(live))]
    assert len(client) >= 5 * 3 and (client["cgroup_id"] == client["conn_id"].map(
        {cid: lc.cgroup_id for cid, lc in live.items()})).all()
    assert (client["cgroup"] == mine).all() and client["container_id"].isna().all()
    accepted = tr[tr["rport"].isin(ports) & (tr["lport"] == sport)]
    assert len(accepted) >= 5 * 2 and (accepted["cgroup"] == mine).all()
    # its accepted peer: a handshake of SYN_RECV's time
    passive = frame[frame["rport"].isin(ports) & (frame["lport"] == sport)]
    assert len(passive) == 5 and passive["handshake_ms"].notna().all()
    assert passive["rtt_ms"].notna().all() and (passive["cgroup"] == mine).all()
    # analyze: per peer, RTT at close, retransmits, handshake percentiles
    from tcplife_trace import analysis_report
    mine_rows = rec.lifecycles()
    mine_rows = mine_rows[(mine_rows.lport.isin(ports) & (mine_rows.rport == sport))
                          | (mine_rows.rport.isin(ports) & (mine_rows.lport == sport))]
    (row,) = analysis_report.peer_health_at_close(mine_rows).itertuples()
    assert row.raddr == "127.0.0.1" and row.connections == 10 and row.retransmits == 0
    assert row.rtt_ms_median == mine_rows.rtt_ms.median()
    assert row.handshake_ms_p50 == pytest.approx(mine_rows.handshake_ms.median())
    assert "handshake ms per peer" in "\n".join(analysis_report._close_health_text(mine_rows))


def test_a_recording_without_folds_loads_with_them_na(tmp_path):
    """Schema 2 (events only): the fold's columns are there, NA; a lives batch that does not
    read is skipped with a warning, not a failure."""
    head = dict(recording.header("none", 0), schema_version=2)
    p = str(tmp_path / "v2.arrow")
    w = RecordingWriter(p, head)
    from tcplife_trace.probes.decode import events_array
    ev = [(1_000, 0xA, 7, 0, 0, 1, 10, 10, 0, 0, 0, 80, 2, 1, 7, 2, 0x04, bytes(16), bytes(16), b"c".ljust(16, b"\0"), 0),
          (2_000, 0xA, 7, 0, 0, 1, 10, 10, 0, 0, 4000, 80, 2, 1, 2, 1, 0x04, bytes(16), bytes(16), b"c".ljust(16, b"\0"), 1)]
    w.add_batch(events_array(ev))
    w.close({})
    rec = load(p)
    lc = rec.lifecycles()
    assert len(lc) == 1 and rec.lives.num_rows == 0
    assert lc["handshake_ms"].iloc[0] == pytest.approx(1e-3)  # from the events alone: 1 us in SYN_SENT
    for c in ("rtt_ms", "total_retrans", "retransmits", "cgroup_id", "cgroup", "container_id"):
        assert lc[c].isna().all(), c
    for c in ("cgroup_id", "cgroup", "container_id"):
        assert rec.transitions[c].isna().all(), c
    # a LIFE batch: recorded, read back as its rows
    p3 = str(tmp_path / "v3.arrow")
    w = RecordingWriter(p3, recording.header("none", 0))
    w.add_batch(events_array(ev))
    lives = np.zeros(1, LIFE_DTYPE)
    lives["ev"]["gen"], lives["agg"]["retrans"], lives["agg"]["lflags"] = 7, 3, 0x20
    lives["agg"]["health_mask"], lives["agg"]["health"][0, 0] = 1, 8 * 1500  # srtt_us << 3: 1.5 ms
    lives["agg"]["owner_src"] = 5  # no owner: no cgroup
    w.add_lives(lives)
    w.close({})
    lc = load(p3).lifecycles()
    assert lc["retransmits"].iloc[0] == 3 and lc["rtt_ms"].iloc[0] == 1.5
    assert lc["min_rtt_ms"].isna().all() and lc["cgroup_id"].isna().all()
    assert os.path.getsize(p3) > os.path.getsize(p)


def test_a_schema_3_recording_loads_with_the_events_cgroup_na(tmp_path):
    """Before schema 4 an event had no cgroup_id column: such a file loads, the column zero
    (the transitions frame's cgroup columns NA), its lifecycles' cgroup from its LIFE records."""
    import json

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from tcplife_trace.probes.decode import events_array
    from tcplife_trace.probes.event_layout import ARROW_TYPES, V3_FIELD_NAMES
    ev = [(1_000, 0xA, 7, 0, 0, 1, 10, 10, 0, 0, 0, 80, 2, 1, 7, 2, 0x04, bytes(16), bytes(16), b"c".ljust(16, b"\0"), 0),
          (2_000, 0xA, 7, 0, 0, 1, 10, 10, 0, 0, 4000, 80, 2, 1, 2, 1, 0x04, bytes(16), bytes(16), b"c".ljust(16, b"\0"), 1)]
    events = events_array(ev)
    head = {**recording.header("none", 0), "schema_version": 3, "event_size": 152}
    v3 = [(n, ARROW_TYPES[n]) for n in V3_FIELD_NAMES]
    schema = pa.schema([pa.field(n, t) for n, t in v3], metadata={recording.KEY: json.dumps(head).encode()})
    cols = [pa.Array.from_buffers(t, len(events), [None, pa.py_buffer(np.ascontiguousarray(events[n]).tobytes())])
            for n, t in v3]
    lives = np.zeros(1, LIFE_DTYPE)
    lives["ev"]["gen"], lives["agg"]["owner_src"], lives["agg"]["cgroup_id"] = 7, 0, 4242
    path = tmp_path / "v3.arrow"
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
        w.write_batch(pa.RecordBatch.from_arrays([c[:0] for c in cols], schema=schema), custom_metadata={
            recording.LIVES_KEY: recording._lives_blob([recording.lives_table(lives, lambda i: "/gone.scope")])})
    rec = load(str(path))
    assert rec.warnings[-1].endswith("no exit summary); loaded every complete batch") and len(rec.warnings) == 1
    assert rec.events.column_names == list(ARROW_TYPES) and rec.events["cgroup_id"].to_pylist() == [0, 0]
    tr = rec.transitions
    assert len(tr) == 2 and tr["cgroup_id"].isna().all() and tr["cgroup"].isna().all()
    lc = rec.lifecycles()
    assert lc["cgroup_id"].tolist() == [4242] and lc["cgroup"].tolist() == ["/gone.scope"]


def test_the_start_up_windows_folds_are_recorded_as_folds_not_events(tmp_path):
    """Connections that end while the tracer checks its offsets at start (the records read
    meanwhile come as tuples) reach the recording as the rest do: their events as events,
    their folded records in the lives batches, never a LIFE record in the events table."""
    import threading

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from tcplife_trace.probes.event_layout import EventKind
    stop = threading.Event()

    def churn():  # loopback connections through the start-up, bounded in count and time
        ls = socket.create_server(("127.0.0.1", 0))
        deadline = time.monotonic() + 6
        for _ in range(60000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            c = socket.create_connection(ls.getsockname())
            a, _ = ls.accept()
            c.close()
            a.close()
        ls.close()
    t = threading.Thread(target=churn, daemon=True)
    t.start()
    path = str(tmp_path / "early.arrow")
    offset = time.time_ns() - time.monotonic_ns()
    w = RecordingWriter(path, recording.header("none", offset))
    try:
        s = LiveSession(recorder=w, wall_offset_ns=offset)
        early_lives = sum(1 for e in s._early if e[13] == int(EventKind.LIFE))
        for _ in range(10):
            s.poll(50)
    finally:
        stop.set()
        t.join(10)
        report = s.stop()
        w.close(report)
    assert early_lives > 0  # (the churn ran through the check: the case is there)
    with pa.memory_map(path) as f:
        table = ipc.open_stream(f).read_all()
    kinds = np.asarray(table["kind"])
    assert not (kinds == int(EventKind.LIFE)).any()
    assert load(path).lives.num_rows >= early_lives
