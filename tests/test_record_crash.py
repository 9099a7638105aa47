"""--record under SIGKILL: at most the last second is lost, at any moment of a trace.

A real churn on loopback, the real tracer killed with SIGKILL at several moments: right
after the ready line (while the detectors import and take their first full look at every
socket, with the default --poll-interval 5), with the detectors off, and later, around the
first periodic look. Every connection that started more than a second before the kill
must be in the file.
"""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.compute as pc
import pytest

from tcplife_trace import load
from tcplife_trace.probes.tcp_states import TcpState as S

from test_cli import EXE

# a bounded loopback churn: connects as fast as it can up to RATE a second, at most
# MAX_CONNS connections and MAX_S seconds; prints its port, starts on "go", stops on EOF of
# stdin (or its bounds) and prints [connect start (CLOCK_MONOTONIC ns), local port] of each
CHURN = r"""
import json, os, select, socket, sys, threading, time
RATE, MAX_CONNS, MAX_S = 1000, 12000, 15
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1024)
port = ls.getsockname()[1]
def serve():
    while True:
        try:
            c, _ = ls.accept()
        except OSError:
            return
        c.close()
threading.Thread(target=serve, daemon=True).start()
print(port, flush=True)
sys.stdin.readline()  # go
made, t0 = [], time.monotonic()
while len(made) < MAX_CONNS and time.monotonic() - t0 < MAX_S:
    if select.select([sys.stdin], [], [], 0)[0]:
        break  # stop (EOF)
    wait = t0 + len(made) / RATE - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    start = time.monotonic_ns()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    made.append((start, c.getsockname()[1]))
    c.close()
print(json.dumps(made), flush=True)
"""


def _killed_recording(tmp_path, delay_s, flags):
    path = tmp_path / f"killed-{delay_s}.arrow"
    churn = subprocess.Popen([sys.executable, "-c", CHURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(churn.stdout.readline())
    tracer = subprocess.Popen([EXE, "--record", str(path), *flags], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        while True:
            line = tracer.stderr.readline()
            assert line, f"the tracer ended before tracing ({tracer.wait()})"
            if "tracing TCP state changes" in line:
                break
        churn.stdin.write("go\n")
        churn.stdin.flush()
        time.sleep(delay_s)
        tracer.send_signal(signal.SIGKILL)
        kill_ns = time.monotonic_ns()
        tracer.wait(timeout=10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
        churn.stdin.close()
    made = json.loads(churn.stdout.readline())
    churn.wait(timeout=30)
    return path, port, made, kill_ns


@pytest.mark.privileged
@pytest.mark.parametrize("delay_s,flags", [
    (1.2, []),                           # the detectors' start-up (default --poll-interval 5)
    (1.6, []),
    (1.2, ["--poll-interval", "0"]),     # no detectors
    (2.5, ["--poll-interval", "1"]),     # around periodic looks
    (5.5, []),                           # just after the first periodic look (each writes a snapshot)
])
def test_sigkill_loses_at_most_the_last_second(tmp_path, delay_s, flags):
    path, port, made, kill_ns = _killed_recording(tmp_path, delay_s, flags)
    due = Counter(lport for start, lport in made if start < kill_ns - 1_000_000_000)
    assert sum(due.values()) >= 150, f"too little churn to judge: {len(made)} connections"
    rec = load(str(path))  # never an error: the schema is there from the start
    ev = rec.events
    established = pc.and_(pc.and_(pc.equal(ev["oldstate"], int(S.SYN_SENT)), pc.equal(ev["newstate"], int(S.ESTABLISHED))),
                          pc.equal(ev["dport"], port))
    recorded = Counter(ev.filter(established)["sport"].to_pylist())
    missing = {p: n - recorded[p] for p, n in due.items() if recorded[p] < n}
    assert not missing, (f"{sum(missing.values())} of {sum(due.values())} connections that started more "
                         f"than 1 s before the SIGKILL are not in the recording ({rec.events.num_rows} events)")
    assert rec.end is None and rec.warnings  # killed: no exit summary, and it says so


@pytest.mark.privileged
def test_the_schema_is_on_disk_before_any_event(tmp_path):
    """Killed at once after the ready line: the file opens as an (empty or short) recording."""
    path, port, made, kill_ns = _killed_recording(tmp_path, 0.05, [])
    assert os.path.getsize(path) > 0
    rec = load(str(path))
    assert rec.header["tool"] == "tcplife-trace"
