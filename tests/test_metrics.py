"""Prometheus metrics: counters and histograms from synthetic streams, the label cap, and a
scrape of the real endpoint while the real tracer follows a known loopback workload."""
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from synthetic import ev
from tcplife_trace.analysis.lifecycle import Tracker
from tcplife_trace.metrics import Metrics


def samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(metrics: Metrics) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics)
    return samples(generate_latest(reg).decode())


def feed(metrics: Metrics, rows):
    t = Tracker(on_transition=metrics.on_transition, on_close=metrics.on_close)
    t.feed_all([ev(*r) for r in rows])
    t.finish()


def client(gen, port, t0):
    return [(t0, "S", gen, "CLOSE", "SYN_SENT", 10, 0, port), (t0 + 0.05, "S", gen, "SYN_SENT", "ESTABLISHED", 10, 40000 + gen, port),
            (t0 + 2000, "S", gen, "ESTABLISHED", "FIN_WAIT1", 10, 40000 + gen, port),
            (t0 + 2001, "S", gen, "FIN_WAIT1", "FIN_WAIT2", 0, 40000 + gen, port),
            (t0 + 2002, "S", gen, "FIN_WAIT2", "CLOSE", 0, 40000 + gen, port)]


def test_counters_and_histogram_from_a_stream():
    m = Metrics()
    feed(m, client(1, 80, 0) + client(2, 80, 10) + [(20, "S", 3, "CLOSE", "SYN_SENT", 11, 0, 81),
                                                     (21, "RR", 3), (21.1, "S", 3, "SYN_SENT", "CLOSE", 0, 40003, 81)])
    s = scrape(m)
    assert s[("tcplife_transitions_total", (("new_state", "SYN_SENT"), ("old_state", "CLOSE")))] == 3
    assert s[("tcplife_connections_opened_total", (("role", "active"),))] == 3
    assert s[("tcplife_connections_closed_total", (("end_reason", "active_close"), ("role", "active")))] == 2
    assert s[("tcplife_connections_closed_total", (("end_reason", "refused"), ("role", "active")))] == 1
    est = lambda le: s[("tcplife_state_duration_seconds_bucket", (("le", le), ("state", "ESTABLISHED")))]  # noqa: E731
    assert est("1.0") == 0 and est("5.0") == 2 and est("+Inf") == 2  # ~2 s each
    assert s[("tcplife_state_duration_seconds_count", (("state", "ESTABLISHED"),))] == 2
    assert s[("tcplife_state_duration_seconds_sum", (("state", "ESTABLISHED"),))] == pytest.approx(3.9999, abs=1e-3)
    syn = lambda le: s[("tcplife_state_duration_seconds_bucket", (("le", le), ("state", "SYN_SENT")))]  # noqa: E731
    assert syn("0.0001") == 2 and syn("0.001") == 2 and syn("0.01") == 3 and syn("+Inf") == 3  # refused: 1.1 ms


def test_opt_in_labels_are_capped():
    m = Metrics(("port", "comm"), label_cap=2)
    feed(m, [r for g, port in enumerate((80, 81, 82, 83), start=1) for r in client(g, port, g * 10)])
    s = scrape(m)
    closed = {k[1]: v for k, v in s.items() if k[0] == "tcplife_connections_closed_total"}
    ports = {dict(lbl)["port"] for lbl in closed}
    assert ports == {"80", "81", "other"}  # the first two distinct values, then "other"
    assert sum(closed.values()) == 4
    assert s[("tcplife_label_overflow_total", ())] == 4  # 2 ports x (opened, closed) folded
    with pytest.raises(ValueError, match="unknown metric label 'peer'"):
        Metrics(("peer",))


@pytest.mark.privileged
def test_scrape_during_a_real_traced_workload():
    with socket.socket() as probe:  # a free port for the endpoint
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    agent = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(mport),
                              "--metrics-labels", "port", "--duration", "20", "--poll-interval", "1"],
                             stderr=subprocess.PIPE, text=True)
    try:
        line = agent.stderr.readline()
        assert "metrics on http://127.0.0.1:" in line, line
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        n = 25
        for _ in range(n):  # the client closes first: active_close into TIME_WAIT, passive_close
            c = socket.create_connection(("127.0.0.1", port))
            a, _ = srv.accept()
            c.sendall(b"x")
            a.recv(1)
            c.close()
            a.recv(1)
            a.close()
        srv.close()
        want = {
            ("tcplife_connections_opened_total", (("port", str(port)), ("role", "active"))): n,
            ("tcplife_connections_opened_total", (("port", str(port)), ("role", "passive"))): n,
            ("tcplife_connections_closed_total", (("end_reason", "active_close"), ("port", str(port)),
                                                  ("role", "active"))): n,
            ("tcplife_connections_closed_total", (("end_reason", "passive_close"), ("port", str(port)),
                                                  ("role", "passive"))): n,
        }
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                s = samples(r.read().decode())
            settled = (s.get(("tcplife_events_received_total", ()), 0) > 0  # refreshed once a second
                       and s.get(("tcplife_sockets", (("state", "TIME_WAIT"),)), 0) >= n)  # next sock_diag look
            if (settled and all(s.get(k) == v for k, v in want.items())) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert {k: s.get(k) for k in want} == want
        assert s[("tcplife_events_received_total", ())] > 0
        assert sum(v for k, v in s.items() if k[0] == "tcplife_events_lost_total") == 0
        assert s[("tcplife_build_info", (("kernel", __import__("os").uname().release),
                                         ("version", __import__("tcplife_trace").__version__)))] == 1
        # sock_diag counts: our TIME_WAIT sockets are there (the poll reads them from sockstat)
        assert s.get(("tcplife_sockets", (("state", "TIME_WAIT"),)), 0) >= n
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    assert agent.returncode == 0


@pytest.mark.privileged
def test_metrics_port_in_use_is_one_line_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(port),
                            "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in err[0] and "Traceback" not in r.stderr
