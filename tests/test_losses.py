"""Loss accounting: every event the kernel tried to send is received or counted lost, once.

events_received + events_lost == events_emitted_by_kernel, exactly and per kind, when both
buffers refuse events under a real churn and when the kernel skips our programs because
another BPF program holds the CPU (recursion misses, provoked here for real); --strict and
LiveSession.degraded see every kind of loss and disorder; the Prometheus loss series exist
at 0 from the first scrape.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from test_metrics import samples
from tcplife_trace import losses, recording
from tcplife_trace.live import LiveSession
from tcplife_trace.metrics import Metrics
from tcplife_trace.probes.event_layout import EventKind
from tcplife_trace.probes.program import Settings
from tcplife_trace.probes.stream import KIND_NAMES
from tcplife_trace.render.views import summary_text

HERE = os.path.dirname(__file__)
STATE = int(EventKind.STATE)
LOOPBACK = socket.inet_aton("127.0.0.1")

# N loopback connections, one after another, the client closing first: exactly 10 state
# changes each (client CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE, accepted child
# LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE), plus the listener's 2.
CHURN = """
import os, socket, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
n = int(sys.argv[1])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(64); port = ls.getsockname()[1]
print("PORT", port, flush=True)
deadline = time.monotonic() + 30
for _ in range(n):
    if time.monotonic() > deadline:
        sys.exit("churn did not finish in time")
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    a, _ = ls.accept(); a.settimeout(5)
    c.close()
    a.recv(1)  # EOF: the client's FIN
    a.close()
time.sleep(0.3)  # the last ACKs and FINs land
ls.close()
print("DONE", flush=True)
"""


class Netns:
    """A network namespace of the test's own, with its loopback up."""

    def __init__(self, tag: str, rps_cpus: str | None = None):
        self.name = f"tltloss{tag}{os.getpid()}"
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        setup = "ip link set lo up"
        if rps_cpus:  # steer its loopback packets to those CPUs (receive packet steering)
            setup += f" && echo {rps_cpus} > /sys/class/net/lo/queues/rx-0/rps_cpus"
        subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c", setup], check=True)

    def churn(self, conns: int, cpu: int) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", CHURN, str(conns), str(cpu)],
                                stdout=subprocess.PIPE, text=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def assert_exact(report: dict) -> None:
    """received + lost == emitted, in total and for every kind."""
    assert report["events_received"] + report["events_lost"] == report["events_emitted_by_kernel"], report
    got, lost, emitted = (report[f"events_{w}_by_kind"] for w in ("received", "lost", "emitted"))
    kinds = set(got) | set(lost) | set(emitted)
    assert {k: got.get(k, 0) + lost.get(k, 0) for k in kinds} == {k: emitted.get(k, 0) for k in kinds}
    assert sum(got.values()) == report["events_received"] and sum(lost.values()) == report["events_lost"]


def run_until(session: LiveSession, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        session.poll(50)
    if proc.poll() is None:
        proc.kill()
    out = proc.stdout.read()
    assert proc.wait() == 0 and "DONE" in out, out
    return out


@pytest.mark.privileged
@pytest.mark.parametrize("mode", ["stream", "aggregate"])
def test_both_buffers_refuse_and_every_event_is_received_or_lost_once(mode):
    """A one-page ring and a one-page-per-CPU overflow buffer, and a consumer that does not read
    while 1000 connections churn: most events are refused by both, some go through the overflow
    buffer; each is counted once (the overflow refusals were counted twice, once in the kernel and
    again from perf's lost records, and emitted left the lost ones out)."""
    ns = Netns("b")
    try:
        s = LiveSession(Settings(rb_pages=1, overflow_pages=1, mode=mode))
        try:
            churn = ns.churn(1000, 0)
            out = churn.stdout.read()  # the consumer stalls: nothing is read until the churn ends
            assert churn.wait() == 0 and "DONE" in out, out
            for _ in range(5):
                s.poll(20)
        finally:
            report = s.stop()
    finally:
        ns.delete()
    assert_exact(report)
    lost = report["events_lost_by_kind"]
    assert lost.get("state" if mode == "stream" else "life", 0) > 100, report  # both buffers refused
    assert report["events_via_overflow"] > 0, report                          # the overflow took some
    assert report["ring_discarded"] == 0
    # perf's own lost count reports some of the same refusals again: not added to the losses
    assert report["overflow_buffer_lost"] <= report["events_lost"]
    assert s.degraded()
    line = [ln for ln in summary_text(report).splitlines() if "received of" in ln][0]
    assert f"{report['events_received']} received of {report['events_emitted_by_kernel']} emitted; " \
           f"lost {report['events_lost']} (" in line


@pytest.mark.privileged
def test_recursion_misses_are_provoked_counted_and_recorded(tmp_path):
    """Another BPF program holds CPU 1 (a test-only program spinning in process context); the
    namespace's loopback packets are steered to CPU 1, so the softirq state changes of a known
    churn interrupt it there and the kernel skips our programs: every one it skipped must be
    counted lost, in the report, the summary, the recording's end, --strict and the metrics."""
    if os.cpu_count() < 2:
        pytest.fail("this test needs two CPUs: one spins inside BPF, the other drives the churn")
    ns = Netns("r", rps_cpus="2")
    path = str(tmp_path / "rec.arrow")
    offset = time.time_ns() - time.monotonic_ns()
    writer = recording.RecordingWriter(path, recording.header("none", offset))
    spinner = subprocess.Popen([sys.executable, os.path.join(HERE, "bpf_spinner.py"), "1", "2000", "30"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout.readline().startswith("READY")
        s = LiveSession(Settings(), recorder=writer, keep_events=True, wall_offset_ns=offset)
        try:
            conns = 500
            port = int(run_until(s, ns.churn(conns, 0)).split()[1])
            spinner.stdin.close()  # stop spinning; what follows is only ours
            for _ in range(5):
                s.poll(20)
            metrics = Metrics()
            metrics.update(s.counts_now())
        finally:
            report = s.stop()
    finally:
        if spinner.poll() is None:
            spinner.kill()
        spinner.wait()
        ns.delete()
    misses = report["recursion_misses"]
    assert set(misses) == set(s.program.source.tracepoints) and misses["sock:inet_sock_set_state"] > 0, misses
    # the churn's transitions: those of its listener's port (not its netns: a socket whose birth
    # and the destroy before it were both skipped takes over the stale entry of whatever socket
    # last had its address, and that entry's netns, maybe another namespace's)
    ours = sum(1 for e in s.kept if e[13] == STATE and port in (e[10], e[11]) and e[17][:4] == LOOPBACK)
    expected = 10 * conns + 2
    skipped = expected - ours - report["events_lost_by_kind"].get("state", 0)
    assert skipped > 0  # the kernel did skip some of the churn's transitions ...
    # ... and counted them: in most runs every one (misses == skipped, or more with other traffic
    # skipped too); in some, a few percent were in no counter the kernel keeps (README, "What
    # counts as lost"): at least 90% must be counted
    assert misses["sock:inet_sock_set_state"] >= 0.9 * skipped, (skipped, misses)
    for tp, n in misses.items():
        assert report["events_lost_by_kind"].get(f"recursion:{tp}", 0) == n
        assert report["events_emitted_by_kind"].get(f"recursion:{tp}", 0) == n
    assert_exact(report)
    assert report["events_lost"] >= misses["sock:inet_sock_set_state"] > 0
    assert s.degraded() and "events_lost" in losses.degraded_by(report)[0]
    assert f"recursion:sock:inet_sock_set_state {misses['sock:inet_sock_set_state']}" in summary_text(report)
    end = recording.load(path).end
    assert end["recursion_misses"] == misses and end["events_lost"] == report["events_lost"]
    series = {dict(k[1])["kind"]: v for k, v in _scrape(metrics).items() if k[0] == "tcplife_events_lost_total"}
    assert series["recursion:sock:inet_sock_set_state"] > 0


def _scrape(metrics: Metrics) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics)
    return samples(generate_latest(reg).decode())


@pytest.mark.privileged
def test_every_loss_series_is_there_at_zero_from_the_first_scrape():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    agent = subprocess.Popen([sys.executable, "-m", "tcplife_trace.cli", "serve", "--metrics-port", str(mport),
                              "--duration", "10", "--poll-interval", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = agent.stderr.readline()
        assert "metrics on http://127.0.0.1:" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            s = samples(r.read().decode())
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    series = {dict(k[1])["kind"]: v for k, v in s.items() if k[0] == "tcplife_events_lost_total"}
    tracepoints = ["sock:inet_sock_set_state", "tcp:tcp_destroy_sock", "tcp:tcp_receive_reset",
                   "tcp:tcp_send_reset", "sock:inet_sk_error_report", "sock:sock_recv_length",
                   "sock:sock_send_length", "tcp:tcp_retransmit_synack", "tcp:tcp_retransmit_skb",
                   "tcp:tcp_cong_state_set"]  # all present on this kernel
    want = set(KIND_NAMES.values()) | {f"recursion:{tp}" for tp in tracepoints} | {"ring_discarded"}
    assert set(series) == want
    assert all(series[k] == 0 for k in KIND_NAMES.values())  # nothing refused by the buffers at start


def test_strict_fails_on_every_kind_of_loss_and_disorder():
    clean = {"events_lost": 0, "ring_discarded": 0, "conn_map_full": 0, "evictions": 0,
             "overflow_out_of_order": 0, "sequence_gaps": 0, "unmatched_errors": 3}
    assert losses.degraded_by(clean) == []
    for field in ("events_lost", "ring_discarded", "conn_map_full", "evictions", "overflow_out_of_order",
                  "sequence_gaps"):
        assert losses.degraded_by({**clean, field: 2}) == [f"{field} 2"]


def test_accounting_adds_recursion_misses_as_emitted_and_lost():
    kernel = {"emitted": {"state": 10, "destroy": 2}, "lost": {"state": 3, "destroy": 0},
              "recursion": {"sock:inet_sock_set_state": 4, "tcp:tcp_destroy_sock": 0}}
    a = losses.account(kernel, {"state": 6, "destroy": 2}, ring_discarded=1)
    assert (a["received"], a["lost"], a["emitted"]) == (8, 8, 16)
    assert a["received"] + a["lost"] == a["emitted"]
    assert a["lost_by_kind"] == {"state": 3, "destroy": 0, "recursion:sock:inet_sock_set_state": 4,
                                 "recursion:tcp:tcp_destroy_sock": 0, "ring_discarded": 1}
    assert "consumer fell behind" not in losses.why({"recursion:sock:inet_sock_set_state": 4})
    assert "another BPF program" in losses.why({"recursion:sock:inet_sock_set_state": 4})
    assert "consumer fell behind" in losses.why({"state": 1})
