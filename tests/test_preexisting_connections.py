"""Connections open before the trace that only read and write during it (no state change)
are lifecycles offline as they are live: birth unseen, the owner from the read or write,
still open at the end; and one that then closes ends the same way on both sides."""
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from tcplife_trace import load, recording
from tcplife_trace.probes.tcp_states import state_name
from tcplife_trace.recording import RecordingWriter
from tcplife_trace.render.views import errno_name

# opens a loopback pair per family before the tracer starts; on "go" every socket writes and
# reads, then the "closing" pairs close (the client first, the server on its EOF)
PEER = r"""
import socket, sys
pairs = {}
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    ls = socket.socket(fam); ls.bind((host, 0)); ls.listen(4)
    for name in ("staying", "closing"):
        c = socket.create_connection(ls.getsockname()[:2], timeout=5); a, _ = ls.accept()
        pairs[(fam, name)] = (c, a)
    ls.close()
ports = [str(c.getsockname()[1]) for c, _ in pairs.values()]
print("READY", *ports, flush=True)
assert sys.stdin.readline().strip() == "go"
for (fam, name), (c, a) in pairs.items():
    for _ in range(3):
        c.sendall(b"q" * 100); a.recv(100); a.sendall(b"r" * 10); c.recv(10)
for (fam, name), (c, a) in pairs.items():
    if name == "closing":
        c.close(); assert a.recv(1) == b""; a.close()
print("DONE", flush=True)
sys.stdin.readline()  # the staying pairs stay open until the trace has ended
"""


def live_records(closed, still_open, offset):
    """Every field the offline lifecycles frame has that a live Lifecycle holds, as values."""
    out = {}
    for lc, is_open in [(lc, False) for lc in closed] + [(lc, True) for lc in still_open]:
        out[lc.conn_id] = {
            "role": lc.role, "family": lc.family, "laddr": lc.laddr, "lport": lc.lport or None,
            "raddr": lc.raddr, "rport": lc.rport or None, "netns": lc.netns, "uid": lc.uid,
            "birth_seen": lc.birth_seen, "start": lc.start_ns + offset,
            "end": None if is_open or lc.end_ns is None else lc.end_ns + offset,
            "duration_s": None if lc.duration_ns is None else lc.duration_ns / 1e9,
            "pid": lc.owner_pid, "comm": lc.owner_comm, "owner_source": lc.owner_source,
            "listener_pid": lc.listener_pid,
            "end_reason": "open" if is_open else lc.end_reason,
            "end_detail": None if is_open else lc.end_detail,
            "errno": None if is_open else errno_name(lc.errno), "time_wait": lc.time_wait,
            "tx_b": lc.tx_b, "rx_b": lc.rx_b, "eof_seen": None if lc.eof_ns is None else lc.eof_ns + offset,
            "path": " ".join(state_name(s) for s in lc.path),
        }
    return out


def offline_records(frame):
    def value(v):
        if isinstance(v, pd.Timestamp):
            return v.value
        return None if pd.isna(v) else v
    return {int(r["conn_id"]): {k: value(v) for k, v in r.items() if k in FIELDS}
            for r in frame.to_dict("records")}


FIELDS = ("role", "family", "laddr", "lport", "raddr", "rport", "netns", "uid", "birth_seen", "start", "end",
          "duration_s", "pid", "comm", "owner_source", "listener_pid", "end_reason", "end_detail", "errno",
          "time_wait", "tx_b", "rx_b", "eof_seen", "path")


@pytest.mark.privileged
def test_preexisting_connections_agree_live_and_offline(tmp_path):
    from tcplife_trace.live import LiveSession
    peer = subprocess.Popen([sys.executable, "-c", PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = peer.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        offset = time.time_ns() - time.monotonic_ns()
        path = tmp_path / "pre.arrow"
        closed = []
        s = LiveSession(on_close=closed.append, wall_offset_ns=offset,
                        recorder=RecordingWriter(str(path), recording.header("none", offset)))
        peer.stdin.write("go\n")
        peer.stdin.flush()
        deadline = time.monotonic() + 15
        done = None
        while time.monotonic() < deadline and done is None:
            s.poll(50)
            if peer.poll() is None:
                os.set_blocking(peer.stdout.fileno(), False)
                done = peer.stdout.readline() or None
        assert done and done.startswith("DONE"), done
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            s.poll(50)
        s.stop()
    finally:
        if peer.poll() is None:
            peer.stdin.write("bye\n")
            peer.stdin.flush()
        peer.wait(timeout=15)
    live = live_records(closed, s.still_open, offset)
    offline = offline_records(load(str(path)).lifecycles())
    assert set(offline) == set(live)
    for cid, want in live.items():
        got = offline[cid]
        for field in FIELDS:
            w, g = want[field], got[field]
            if field == "duration_s" and w is not None:
                assert abs(g - w) < 1e-9, (cid, field)
            else:
                assert g == w, (cid, field, g, w)
    # the peer's own: four sockets that only read and wrote (two families), four that closed
    mine = [r for r in live.values() if r["pid"] == peer.pid]
    io_only = [r for r in mine if r["path"] == ""]
    assert len(io_only) == 4 and all(r["end_reason"] == "open" and not r["birth_seen"]
                                     and r["owner_source"] == "io" and r["start"] > offset for r in io_only)
    ended = sorted(r["end_reason"] for r in mine if r["path"])
    assert ended == ["active_close", "active_close", "passive_close", "passive_close"], ended
    assert all(not r["birth_seen"] and r["end"] is not None and r["owner_source"] in ("io", "close")
               for r in mine if r["path"])
