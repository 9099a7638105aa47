"""session.Session, the one live loop of trace, serve, doctor and a notebook, on the real
kernel: a loopback workload during the session is seen by the tracer and by the detectors'
looks, and the report carries the tracer's keys and the detectors' ones."""
from __future__ import annotations

import socket
import threading

from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from tcplife_trace.session import DETECTOR_KEYS, Session

PORT = 7231


def _workload(n: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(64)
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", PORT), timeout=2)
        a, _ = srv.accept()
        c.close()
        a.close()
    srv.close()


def test_session_traces_looks_and_reports():
    closed, notices = [], []
    with Session(prog.Settings(Filters(lports=(PORT,))), poll_interval_s=0.5, on_close=closed.append,
                 on_notice=notices.append) as s:
        s.seed()
        assert s.seed_counts is not None  # the first look happened before the workload
        t = threading.Thread(target=_workload, args=(20,))
        started = []
        report = s.run(2.0, after_poll=lambda: started or (started.append(1), t.start()))
        t.join(5)
    for key in DETECTOR_KEYS:
        assert key in report
    assert report["socket_polls"] >= 2  # every 0.5 s over 2 s
    assert report["events_lost"] == 0
    # -L: the 20 accepted sockets and the listener (the connecting ones have other local ports)
    assert sum(report["end_reasons"].values()) == len(closed) == 21
    assert {lc.lport for lc in closed} == {PORT}
    assert s.still_open == []


def test_session_without_detectors_has_no_detector_keys():
    with Session(prog.Settings(Filters(lports=(PORT + 1,)))) as s:
        s.seed()
        report = s.run(0.3)
    assert s.watch is None
    assert not set(DETECTOR_KEYS) & set(report)
    assert report["closed"] == 0


def test_a_live_session_fixes_the_heaps_mmap_threshold():
    """tcplife_trace/heap.py: on glibc, mallopt takes the fixed threshold (so freed batch
    buffers above it are unmapped, not kept in RSS); a second call does nothing more."""
    from tcplife_trace import heap
    assert heap.fix_mmap_threshold() is True and heap.fix_mmap_threshold() is True
    assert heap.THRESHOLD >= 128 * 1024
