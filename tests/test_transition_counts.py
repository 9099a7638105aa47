"""The transitions the kernel counts for the metrics (probes/transition_counts.py) against the
ones the Python state machine counts one Transition at a time (Metrics.on_transition), from
the same program's events, on a real workload: every (old, new) pair, the connections opened,
every bucket and sum of the time-in-state histogram; the tracer's own connections (its
start-up check, its metrics endpoint and the scrapes it accepts) left out by both."""
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_kernel_aggregation import WORKLOAD
from test_metrics import samples

from prometheus_client import CollectorRegistry, generate_latest

from tcplife_trace import metrics as metrics_mod
from tcplife_trace.live import LiveSession
from tcplife_trace.metrics import BUCKETS_S, Metrics
from tcplife_trace.probes import program as prog
from tcplife_trace.probes import transition_counts as tc

SOURCE = Path(__file__).resolve().parent.parent / "ebpf" / "tcplife.bpf.c"


def test_the_kernels_buckets_are_the_metrics_ones():
    assert tc.DUR_BOUNDS_NS == tuple(int(round(b * 1e9)) for b in BUCKETS_S)
    text = SOURCE.read_text()
    body = text[text.index("dur_bucket(u64 d)"):]
    body = body[:body.index("}")]
    assert tuple(int(x) for x in re.findall(r"d > (\d+)ULL", body)) == tc.DUR_BOUNDS_NS
    assert f"== {tc.SIZE}," in text  # the struct's size assertion is this module's size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    return samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def _traced(live: LiveSession, port: int, kernel: Metrics) -> tuple[int, dict]:
    """The workload traced by `live`, its endpoint scraped three times meanwhile; (scrapes,
    the kernel-counted metrics' last scrape after the stop)."""
    server = metrics_mod.serve(kernel, port)
    try:
        p = subprocess.Popen([sys.executable, WORKLOAD, "3", "2"], stdout=subprocess.PIPE, text=True)
        scrapes = 0
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            live.poll(20)
            if scrapes < 3:
                _scrape(port)
                scrapes += 1
        assert p.communicate(timeout=5)[0].strip() == "DONE"
        for _ in range(10):
            live.poll(30)
    finally:
        server.shutdown()
        server.server_close()
        live.stop()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(kernel)
    return scrapes, samples(generate_latest(reg).decode())


@pytest.mark.privileged
def test_kernel_counts_equal_the_per_transition_ones():
    objects = Metrics()  # counted from Transition objects, the endpoint's own left out by its port
    live = LiveSession(prog.Settings(), on_transition=objects.on_transition)
    kernel = Metrics()
    port = _free_port()
    objects.attach(live, port, "127.0.0.1")
    kernel.attach(live, port, "127.0.0.1")
    kernel.count_in_kernel(live)
    scrapes, s = _traced(live, port, kernel)
    assert live.report["events_lost"] == 0, live.report["events_lost_by_kind"]
    counts = live.transition_counts()
    assert sum(objects.transitions.values()) >= 3 * 2 * 40  # the workload's at the least
    assert counts.transitions == dict(objects.transitions)  # every (old, new)
    assert counts.hist == objects.hist  # every bucket of every state, and the sums in ns
    assert set(objects.hist) >= {1, 2, 3, 4, 5, 8, 9}  # ESTABLISHED ... LAST_ACK: durations compared
    assert kernel._counted()[1] == objects.opened
    assert objects.own_connections == scrapes == 3
    assert s[("tcplife_metrics_connections_total", ())] == scrapes
    assert counts.self_transitions > 0  # the start-up check's and the scrapes', left out


@pytest.mark.privileged
def test_an_aggregated_session_counts_transitions_it_never_receives():
    live = LiveSession(prog.Settings(mode="aggregate"))
    kernel = Metrics()
    port = _free_port()
    kernel.attach(live, port, "127.0.0.1")
    kernel.count_in_kernel(live)
    scrapes, s = _traced(live, port, kernel)
    assert live.report["events_received_by_kind"].get("state", 0) < 100  # listeners and strays only
    assert live.report["events_lost"] == 0
    t = {(dict(k[1])["old_state"], dict(k[1])["new_state"]): v for k, v in s.items()
         if k[0] == "tcplife_transitions_total"}
    # agg_workload.py: 3 rounds x 2 workers x 23 connection ends, at the least (other traffic adds)
    assert t[("SYN_SENT", "CLOSE")] >= 3 * 2  # the refused connect
    assert t[("CLOSE", "SYN_SENT")] >= 3 * 2 * 11
    assert s[("tcplife_connections_opened_total", (("role", "active"),))] == t[("CLOSE", "SYN_SENT")]
    assert s[("tcplife_state_duration_seconds_count", (("state", "ESTABLISHED"),))] >= 3 * 2 * 20
    assert s[("tcplife_metrics_connections_total", ())] == scrapes == 3
