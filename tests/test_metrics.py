"""Prometheus metrics: counters and histograms from synthetic streams, the label cap, and a
scrape of the real endpoint while the real tracer follows a known loopback workload."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from synthetic import ev
from test_containers import mount, space  # noqa: F401 - fixtures
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


def promtool() -> str:
    """promtool from the venv (scripts/provision.sh --test-tools puts it there) or PATH: never skipped."""
    found = shutil.which("promtool", path=os.path.dirname(sys.executable)) or shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run `sudo scripts/provision.sh --test-tools` (./run.sh test does)")
    return found


def promtool_check_metrics(text: str) -> str:
    """promtool's lint of an exposition: '' when it has nothing to say."""
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return (r.stdout + r.stderr).strip() + ("" if r.returncode == 0 else f" (exit {r.returncode})")


def test_promtool_lints_what_it_should():
    # the check can fail: a counter without _total and a unit not in base form are reported
    bad = "# HELP x_ms Time.\n# TYPE x_ms counter\nx_ms 1\n"
    assert "x_ms" in promtool_check_metrics(bad)


def test_the_endpoints_own_connections_are_not_counted():
    own = os.stat("/proc/self/ns/net").st_ino
    m = Metrics(("port",), label_cap=2)
    m.attach(None, 9470, "127.0.0.1")

    def passive(gen, lport, t0, netns=own):
        rows = [(t0, "S", gen, "LISTEN", "SYN_RECV", 10, lport, 50000 + gen),
                (t0 + 0.1, "S", gen, "SYN_RECV", "ESTABLISHED", 10, lport, 50000 + gen),
                (t0 + 1, "S", gen, "ESTABLISHED", "FIN_WAIT1", 10, lport, 50000 + gen),
                (t0 + 2, "S", gen, "FIN_WAIT1", "FIN_WAIT2", 10, lport, 50000 + gen),
                (t0 + 3, "S", gen, "FIN_WAIT2", "CLOSE", 10, lport, 50000 + gen)]
        return [ev(*r, netns=netns) for r in rows]
    t = Tracker(on_transition=m.on_transition, on_close=m.on_close)
    t.feed_all([ev(0, "S", 1, "CLOSE", "LISTEN", 10, 9470, 0, netns=own)]  # the endpoint's listener
               + passive(2, 9470, 1) + passive(3, 9470, 5)                  # two scrapes
               + passive(4, 9470, 10, netns=own + 1)                         # port 9470 of a container
               + passive(5, 8080, 15))                                       # the host's own service
    t.finish()
    s = scrape(m)
    opened = {k[1]: v for k, v in s.items() if k[0] == "tcplife_connections_opened_total"}
    assert opened == {(("port", "9470"), ("role", "passive")): 1, (("port", "8080"), ("role", "passive")): 1}
    assert s[("tcplife_metrics_connections_total", ())] == 2
    assert sum(v for k, v in s.items() if k[0] == "tcplife_transitions_total") == 10  # two connections' five
    assert s[("tcplife_label_overflow_total", ())] == 0  # the scrapes took no capped port slot


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
        scrapes = 0
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
                s = samples(text)
            scrapes += 1
            settled = (s.get(("tcplife_events_received_total", ()), 0) > 0  # refreshed once a second
                       and s.get(("tcplife_sockets", (("state", "TIME_WAIT"),)), 0) >= n  # next sock_diag look
                       and s.get(("tcplife_socket_poll_duration_seconds_count", ()), 0) >= 1)
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
        # the exposition as promtool wants it, every name, unit and type (no warning at all)
        assert promtool_check_metrics(text) == ""
        # the endpoint's own side of the scrapes is not in the connection counters
        assert not [k for k in s if k[0].startswith("tcplife_connections_") and ("port", str(mport)) in k[1]
                    and dict(k[1])["role"] != "active"]
        assert s[("tcplife_metrics_connections_total", ())] >= scrapes - 1
        # the tracer's own health
        # the events ring (16 MiB by default) and the folded records ring, half of it in the stream mode
        assert s[("tcplife_ring_buffer_size_bytes", ())] == 4096 * 4096 * 2
        assert 0 < s[("tcplife_ring_buffer_peak_fill_ratio", ())] < 1
        assert s[("tcplife_conn_map_capacity", ())] == 65536
        assert 0 <= s[("tcplife_conn_map_entries", ())] <= 65536
        assert s[("tcplife_consumer_cpu_seconds_total", ())] > 0
        assert s[("tcplife_socket_poll_duration_seconds_count", ())] >= 1
        assert s[("process_cpu_seconds_total", ())] >= s[("tcplife_consumer_cpu_seconds_total", ())]
        assert s[("process_resident_memory_bytes", ())] > 0
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


@pytest.mark.privileged
def test_container_label_from_the_owners_cgroup(mount, space):  # noqa: F811
    """`serve --metrics-labels container`: a workload in a docker-shaped cgroup (and a network
    namespace) the test creates; its connections are counted under its container's short id, the
    RTT the kernel read at each CLOSE too, this process's own connections under "none"."""
    import os
    from collections import Counter
    from test_containers import ID, TOP, _workload_in
    from tcplife_trace.analysis.lifecycle import Lifecycle
    from tcplife_trace.metrics import CONTAINER_ID_LEN
    short = ID[:CONTAINER_ID_LEN]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    agent = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(mport),
                              "--metrics-labels", "container,port", "--duration", "20", "--poll-interval", "0"],
                             stderr=subprocess.PIPE, text=True)
    try:
        line = agent.stderr.readline()
        assert "metrics on http://127.0.0.1:" in line, line
        path = f"{TOP}/system.slice/docker-{ID}.scope"
        p = _workload_in(mount, path, space)
        p.stdin.write("go\n")  # it exits: its three connections (both ends) and its listener close
        p.stdin.flush()
        p.wait(10)
        srv = socket.create_server(("127.0.0.1", 0))  # this process's own: no container
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        c.sendall(b"x")
        a.recv(1)
        c.close()
        a.close()
        srv.close()
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            s = samples(text)
            closed = {k: v for k, v in s.items() if k[0] == "tcplife_connections_closed_total"}
            theirs = sum(v for k, v in closed.items() if ("container", short) in k[1])
            ours = sum(v for k, v in closed.items() if ("container", "none") in k[1] and ("port", str(port)) in k[1])
            if (theirs >= 7 and ours >= 3) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        by_role = Counter()
        for k, v in closed.items():
            if ("container", short) in k[1]:
                by_role[dict(k[1])["role"]] += v
        assert theirs == 7 and by_role == {"active": 3, "passive": 3, "listener": 1}, closed
        assert ours == 3  # its client, the accepted side, the listener
        opened = Counter()
        for k, v in s.items():
            if k[0] == "tcplife_connections_opened_total" and ("container", short) in k[1]:
                opened[dict(k[1])["role"]] += v
        assert opened.get("active") == 3, opened
        rtt = sum(v for k, v in s.items() if k[0] == "tcplife_rtt_at_close_seconds_count"
                  and ("container", short) in k[1])
        assert rtt >= 6  # each end had an RTT sample (the handshake, the hello)
        assert promtool_check_metrics(text) == ""
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    assert agent.returncode == 0
    # the retransmit counter takes the same label (a lifecycle as the fold gives it)
    m = Metrics(("container",))
    lc = Lifecycle(1, 0, "active", 0, True)
    lc.cgroup_id, lc.retrans, lc.syn_retrans, lc.end_reason = os.stat(mount + path).st_ino, 5, 1, "timeout"
    m.on_close(lc)
    got = scrape(m)
    assert got[("tcplife_retransmits_total", (("container", short), ("kind", "data")))] == 5
    assert got[("tcplife_retransmits_total", (("container", short), ("kind", "syn")))] == 1
    with pytest.raises(ValueError, match="choose from port, comm, container"):
        Metrics(("pod",))
