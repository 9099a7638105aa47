"""The trace's stdout views as a library object (tcplife_trace/trace_output.py): what
`tcplife-trace` prints, made in a notebook's process. Two sessions trace the same loopback
workload side by side: one without a filter (the lines from the batches' columns and the
kernel's fold) and one under `-L` (the lines from the tracker's Transition and Lifecycle
objects); the lines of the filtered port's connections must say the same, and both must hold
every connection of the workload."""
import json
import os
import socket
import threading

import pytest

from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from tcplife_trace.session import Session
from tcplife_trace.trace_output import TraceOutput

CONNS = 40


def _workload(port: int, family: int, host: str) -> None:
    """CONNS connections to the listener on port, each writing a byte the server reads before
    it closes first (the server's side: LISTEN -> SYN_RECV -> ... -> TIME_WAIT)."""
    for _ in range(CONNS):
        with socket.socket(family) as c:
            c.settimeout(5)
            c.connect((host, port))
            c.sendall(b"x")
            c.recv(1)


def _serve(ls: socket.socket, stop: threading.Event) -> None:
    ls.settimeout(0.2)
    served = 0
    while served < CONNS and not stop.is_set():
        try:
            a, _ = ls.accept()
        except socket.timeout:
            continue
        with a:
            a.recv(1)
        served += 1


def _traced(outputs: list, family: int, host: str) -> tuple[int, list[bytes]]:
    """(the listener's port, each output's bytes) of the workload traced by one session per
    (TraceOutput, settings for the port)."""
    ls = socket.socket(family)
    ls.bind((host, 0))
    ls.listen(64)
    port = ls.getsockname()[1]
    sessions = []
    try:
        for out, settings in outputs:
            settings = settings(port)
            s = Session(settings, **out.session_callbacks(settings.filters))
            out.attach(s)
            sessions.append(s)
        stop = threading.Event()
        server = threading.Thread(target=_serve, args=(ls, stop))
        server.start()
        client = threading.Thread(target=_workload, args=(port, family, host))
        client.start()
        taken = [[] for _ in sessions]
        while client.is_alive() or server.is_alive():
            for s, out, got in zip(sessions, [o for o, _ in outputs], taken):
                s.step(20)
                got.append(out.take())
            client.join(0)
            if not client.is_alive():
                stop.set()
        for _ in range(15):  # the last CLOSEs and their 50 ms hold
            for s, (out, _), got in zip(sessions, outputs, taken):
                s.step(20)
                got.append(out.take())
    finally:
        for s, (out, _), got in zip(sessions, outputs, taken):
            s.finish()
            out.still_open()
            got.append(out.take())
        ls.close()
    return port, [b"".join(got) for got in taken]


def Settings(mode: str, lports: tuple = ()):
    return lambda port: prog.Settings(Filters(lports=(port,)) if lports else Filters(), mode=mode)


@pytest.mark.privileged
@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_transition_lines_from_columns_and_from_objects_agree(family, host):
    plain, filtered = TraceOutput(view="text"), TraceOutput(view="text")
    port, (a, b) = _traced([(plain, Settings("stream")), (filtered, Settings("stream", lports=(1,)))], family, host)
    assert plain.header() == filtered.header() and plain.header().split()[:4] == ["PID", "COMM", "LADDR", "LPORT"]

    def server_side(data: bytes) -> list[list[str]]:
        rows = [line.split() for line in data.decode().splitlines()]
        # (PID COMM LADDR LPORT RADDR RPORT OLD -> NEW; the ms in the old state differ by the
        # two programs' clock reads)
        return [r[:9] for r in rows if len(r) >= 9 and r[3] == str(port)]
    ours, theirs = server_side(a), server_side(b)
    assert sorted(ours) == sorted(theirs)
    births = [r for r in ours if r[6:9] == ["LISTEN", "->", "SYN_RECV"]]
    assert len(births) == CONNS
    owned = [r for r in ours if r[6:9] == ["ESTABLISHED", "->", "FIN_WAIT1"]]  # (the close is ours)
    assert len(owned) == CONNS and {r[0] for r in owned} == {str(os.getpid())}
    tw = [line for line in a.decode().splitlines() if line.endswith("(TIME_WAIT)") and f" {port} " in line]
    assert len(tw) == CONNS  # the server closes first: every connection of ours enters TIME_WAIT


@pytest.mark.privileged
def test_json_and_csv_records():
    js, csv_ = TraceOutput(view="json"), TraceOutput(view="csv")
    port, (a, b) = _traced([(js, Settings("stream")), (csv_, Settings("stream"))], socket.AF_INET, "127.0.0.1")
    assert js.header() is None and csv_.header() is None  # (records: the CSV header comes with the first row)
    records = [json.loads(line) for line in a.decode().splitlines()]
    ours = [r for r in records if r["lport"] == port and r["oldstate"] == "LISTEN"]
    assert len(ours) == CONNS and all(r["type"] == "transition" and r["role"] == "passive" for r in ours)
    lines = b.decode().splitlines()
    head = lines[0].split(",")
    assert {"ts_ns", "lport", "oldstate", "newstate"} <= set(head), head
    rows = [dict(zip(head, line.split(","))) for line in lines[1:]]
    assert sum(1 for r in rows if r["lport"] == str(port) and r["oldstate"] == "LISTEN") == CONNS


@pytest.mark.privileged
def test_lifecycle_lines_from_columns_and_from_objects_agree():
    plain, filtered = TraceOutput(view="text", lifecycles=True), TraceOutput(view="text", lifecycles=True)
    port, (a, b) = _traced([(plain, Settings("aggregate")), (filtered, Settings("aggregate", lports=(1,)))],
                           socket.AF_INET, "127.0.0.1")
    assert plain.header().split()[-2:] == ["STATES", "(ms)"]

    def server_side(data: bytes) -> list[list[str]]:
        rows = [line.split() for line in data.decode().splitlines()]
        # PID COMM LADDR LPORT RADDR RPORT TX_KB RX_KB MS END: all but the lifetime in ms
        return [r[:8] + r[9:10] for r in rows if len(r) >= 10 and r[3] == str(port)]
    ours, theirs = server_side(a), server_side(b)
    assert sorted(ours) == sorted(theirs)
    assert sum(1 for r in ours if r[8] == "active_close+TW") == CONNS
