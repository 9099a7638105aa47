"""Connections still open at the end get their health from the session's last look at the
sockets (sock_diag's tcp_info, joined on netns, laddr, lport, raddr, rport): in the JSON
lifecycle records and -w lines of the open ones live, and in a recording's lifecycles frame
offline, the same values; the connections that ended keep the health the kernel read at CLOSE."""
from __future__ import annotations

import socket
import time

import pandas as pd
import pytest

from tcplife_trace import load, recording
from tcplife_trace.render import views
from tcplife_trace.probes import health
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.session import Session

pytestmark = pytest.mark.privileged


def test_open_connections_take_the_last_looks_health(tmp_path):
    path = str(tmp_path / "open.arrow")
    offset = time.time_ns() - time.monotonic_ns()
    w = RecordingWriter(path, recording.header("none", offset))
    closed = []
    s = Session(poll_interval_s=60, recorder=w, wall_offset_ns=offset, on_close=closed.append)
    lis = socket.create_server(("127.0.0.1", 0))
    try:
        s.seed()
        c = socket.create_connection(lis.getsockname())
        a, _ = lis.accept()
        c.sendall(b"x" * 5000)
        a.recv(5000, socket.MSG_WAITALL)
        a.sendall(b"y" * 300)
        c.recv(300, socket.MSG_WAITALL)
        done = socket.create_connection(lis.getsockname())  # one that ends: health from its CLOSE
        b, _ = lis.accept()
        dport = done.getsockname()[1]
        done.close()
        b.close()
        for _ in range(10):
            s.step(30)
        report = s.finish()  # the last look (ESTABLISHED included), then the stop
        cport, lport = c.getsockname()[1], lis.getsockname()[1]
    finally:
        c.close()
        a.close()
        lis.close()
        w.close(s.report or {})
    assert report["still_open"] >= 2
    import os
    here = os.stat("/proc/self/ns/net").st_ino  # (other tests' loopback connections may share a port)
    ours = lambda lcs, a, b: [lc for lc in lcs if (lc.lport, lc.rport, lc.netns) == (a, b, here)]  # noqa: E731
    (client,) = ours(s.still_open, cport, lport)
    seen = s.open_health[client.conn_id]
    assert client.health_raw is None and seen["rtt_ms"] is not None and seen["rtt_ms"] > 0
    assert seen["data_segs_out"] >= 1 and seen["total_retrans"] == 0
    rec = views.lifecycle_record(client, s.clock, still_open=True, health=seen)
    assert rec["end_reason"] == "open" and all(rec[c] == seen.get(c) for c in health.COLUMNS)
    assert views.lifecycle_record(client, s.clock, still_open=True)["rtt_ms"] is None  # (without the look)
    line = views.TextView(s.clock, wide=True).lifecycle(client, still_open=True, health=seen)
    assert ("%.3f" % seen["rtt_ms"]) in line.split()
    (accepted,) = ours(s.still_open, lport, cport)
    assert s.open_health[accepted.conn_id]["rtt_ms"] is not None
    # offline: the recording's last snapshot is that look; the open rows take the same values
    frame = load(path).lifecycles()
    assert str(frame["rtt_ms"].dtype) == "float64" and str(frame["total_retrans"].dtype) == "Int64"
    frame = frame.set_index("conn_id")
    row = frame.loc[client.conn_id]
    assert row["end_reason"] == "open"
    for c in health.COLUMNS:
        assert (None if pd.isna(row[c]) else row[c]) == seen.get(c), c
    assert frame.loc[accepted.conn_id, "rtt_ms"] == s.open_health[accepted.conn_id]["rtt_ms"]
    # an ended connection keeps the health read at its CLOSE
    (ended,) = ours(closed, dport, lport)
    assert ended.conn_id not in s.open_health and ended.health_raw is not None
    assert frame.loc[ended.conn_id, "end_reason"] != "open"
    assert frame.loc[ended.conn_id, "rtt_ms"] == health.from_fold(ended.health_raw)["rtt_ms"]


def test_without_detectors_one_look_at_the_end_gives_the_open_ones_health():
    """--poll-interval 0: no detectors, yet the connections still open take their health from
    one look at the full sockets at the end."""
    s = Session(poll_interval_s=0)
    lis = socket.create_server(("127.0.0.1", 0))
    try:
        c = socket.create_connection(lis.getsockname())
        a, _ = lis.accept()
        c.sendall(b"x" * 2000)
        a.recv(2000, socket.MSG_WAITALL)
        for _ in range(5):
            s.step(30)
        s.finish()
        cport, lport = c.getsockname()[1], lis.getsockname()[1]
    finally:
        c.close()
        a.close()
        lis.close()
    assert s.watch is None
    import os
    here = os.stat("/proc/self/ns/net").st_ino
    (client,) = [lc for lc in s.still_open if (lc.lport, lc.rport, lc.netns) == (cport, lport, here)]
    seen = s.open_health[client.conn_id]
    assert seen["rtt_ms"] is not None and seen["rtt_ms"] > 0 and seen["data_segs_out"] >= 1
