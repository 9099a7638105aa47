"""The real BPF program on the real kernel, real connections on loopback.

Each test runs a server and a client as separate processes with known PIDs and
asserts the exact transitions, owners, durations and end of every connection.
"""
import os

import pytest

from tcplife_trace.probes.filters import Filters
from tcplife_trace.probes.program import Settings
from tcplife_trace.probes.tcp_states import TcpState as S

from tracing import Server, Traced, client

pytestmark = pytest.mark.privileged

CLIENT_STEPS = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
                ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
CHILD_STEPS = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "CLOSE_WAIT"),
               ("CLOSE_WAIT", "LAST_ACK"), ("LAST_ACK", "CLOSE")]
LISTENER_STEPS = [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]


@pytest.fixture(scope="module")
def traced():
    t = Traced()
    yield t
    t.stop()


def split(conns, server):
    listener = [lc for lc in conns if lc.role == "listener"]
    child = [lc for lc in conns if lc.role == "passive"]
    active = [lc for lc in conns if lc.role == "active"]
    assert (len(listener), len(child), len(active)) == (1, 1, 1), [(c.role, c.path) for c in conns]
    return listener[0], child[0], active[0]


def assert_durations_sum(lc):
    assert lc.birth_seen and not lc.incomplete
    assert sum(lc.state_ns.values()) == lc.duration_ns > 0
    assert all(ns >= 0 for ns in lc.state_ns.values())


@pytest.mark.parametrize("family", ["4", "6"])
def test_client_closes_first(traced, family):
    srv = Server(family, "normal")
    cpid, out = client(family, srv.port, "normal")
    assert "DONE" in out
    srv.wait()
    listener, child, active = split(traced.wait_closed(srv.port, 3), srv)
    loop = "127.0.0.1" if family == "4" else "::1"

    assert traced.steps(active) == CLIENT_STEPS
    assert (active.owner_pid, active.owner_source) == (cpid, "connect")
    assert (active.end_reason, active.time_wait, active.errno) == ("active_close", True, None)
    assert (active.family, active.laddr, active.raddr, active.rport) == (int(family), loop, loop, srv.port)
    assert active.lport == child.rport != 0
    assert active.tx_b is not None and active.tx_b >= 5 and child.rx_b >= 5  # "hello"

    assert traced.steps(child) == CHILD_STEPS
    assert (child.owner_pid, child.owner_source, child.listener_pid) == (srv.pid, "io", srv.pid)
    assert child.end_reason == "passive_close" and not child.time_wait
    assert child.eof_ns is not None
    assert cpid not in child.pids  # the softirq transitions ran as the client: never trusted

    assert traced.steps(listener) == LISTENER_STEPS
    assert (listener.owner_pid, listener.owner_source, listener.end_reason) == (
        srv.pid, "listen", "listener_closed")
    for lc in (active, child, listener):
        assert_durations_sum(lc)
        assert lc.netns is not None and lc.uid == 0


def test_prefork_worker_owns_accepted_socket(traced):
    srv = Server("4", "prefork")
    assert srv.worker_pid != srv.pid
    cpid, _ = client("4", srv.port)
    srv.wait()
    listener, child, active = split(traced.wait_closed(srv.port, 3), srv)
    assert (listener.owner_pid, listener.owner_source) == (srv.pid, "listen")
    assert (child.owner_pid, child.owner_source) == (srv.worker_pid, "io")
    assert child.listener_pid == srv.pid
    assert active.owner_pid == cpid


def test_server_closes_first_passive_close_on_client(traced):
    srv = Server("4", "hold")
    cpid, out = client("4", srv.port, "normal")
    # the client closed first here; use the hold server's CLOSE_WAIT instead
    assert srv.readline() == "EOF"
    srv.send("go")
    srv.wait()
    listener, child, active = split(traced.wait_closed(srv.port, 3), srv)
    assert child.state_ns[S.CLOSE_WAIT] > 0
    assert traced.steps(child) == CHILD_STEPS


def test_server_closes_first(traced):
    srv = Server("4", "linger0")
    cpid, out = client("4", srv.port, "wait")
    assert "RESET" in out
    srv.wait()
    listener, child, active = split(traced.wait_closed(srv.port, 3), srv)
    assert (child.end_reason, child.owner_pid) == ("local_abort", srv.pid)
    # tcp_disconnect reports ECONNRESET to the aborting socket itself, which its owner has
    # closed: nobody saw it, so none is shown (analysis/end_rules.py)
    assert child.errno is None
    # SO_LINGER 0: tcp_disconnect's reset, its reason named by this kernel's BTF (6.10 on)
    from tcplife_trace.probes import btf
    if btf.rst_reason_names()[0]:
        assert child.end_detail == "RST sent (TCP_STATE) in ESTABLISHED"
    assert traced.steps(child)[-1] == ("ESTABLISHED", "CLOSE")
    assert (active.end_reason, active.errno) == ("reset_by_peer", 104)
    assert traced.steps(active)[-1] == ("ESTABLISHED", "CLOSE")
    assert_durations_sum(active)


def test_refused_connect(traced):
    srv = Server("4", "normal")  # find a free port, then close it
    port = srv.port
    client("4", port)
    srv.wait()
    traced.wait_closed(port, 3)
    cpid, out = client("4", port)
    assert "ERR 111" in out
    conns = [lc for lc in traced.wait_closed(port, 4) if lc.owner_pid == cpid]
    assert len(conns) == 1
    lc = conns[0]
    assert traced.steps(lc) == [("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")]
    assert (lc.role, lc.end_reason, lc.errno) == ("active", "refused", 111)
    assert_durations_sum(lc)


def test_exit_report_counts_everything(traced):
    srv = Server("4", "normal")
    client("4", srv.port)
    srv.wait()
    traced.wait_closed(srv.port, 3)
    c = traced.session.tracker.counters
    assert c.closed >= 3 and c.events > 10
    counts = traced.session.stream.kernel_counts()
    assert counts["emitted"]["state"] >= 12
    assert sum(counts["lost"].values()) == 0 and counts["map_full"] == 0


@pytest.mark.parametrize("flt,expect_roles", [
    ("lport", {"listener", "passive"}),
    ("rport", {"active"}),
    ("pid", {"listener", "passive"}),
    ("v6", set()),
])
def test_filters_in_kernel_and_user_space(flt, expect_roles):
    srv = Server("4", "hold")
    other = Server("4", "normal")
    filters = {"lport": Filters(lports=(srv.port,)), "rport": Filters(rports=(srv.port,)),
               "pid": Filters(pids=(srv.pid,)), "v6": Filters(family=6)}[flt]
    t = Traced(Settings(filters))
    try:
        client("4", srv.port)
        client("4", other.port)
        assert srv.readline() == "EOF"
        srv.send("go")
        srv.wait()
        other.wait()
        # let everything arrive, then look at what passed
        t.wait_for(lambda: False, timeout=1.0)
        report = t.stop()
        roles = {lc.role for lc in t.closed}
        assert roles == expect_roles
        assert all(other.port not in (lc.lport, lc.rport) for lc in t.closed)
        assert all(tr.lc.lport in (srv.port, 0) or tr.lc.rport == srv.port for tr in t.transitions)
        assert report["events_lost"] == 0
        if flt != "v6":
            assert len(t.closed) == len(expect_roles)
    finally:
        t.stop()


def test_kernel_side_rejects_a_layout_that_differs_from_python(monkeypatch, capfd):
    """The BPF compile itself checks struct tlt_event against probes/event_layout.py: the
    static assert on the field that moved is what fails (clang says so on fd 2)."""
    from tcplife_trace import ebpf
    from tcplife_trace.probes import program, tracefs
    from tcplife_trace.probes.bcc_import import import_bcc
    src = program.build_source(Settings(), tracefs.find_tracefs())
    bad = [f if not f.startswith("-DTLT_EVOFF_sport=") else f"-DTLT_EVOFF_sport={int(f.split('=')[1]) + 2}"
           for f in src.cflags]
    assert bad != src.cflags
    monkeypatch.setenv("BCC_KERNEL_SOURCE", ebpf.STUB_KERNEL_SOURCE)
    bcc = import_bcc()
    capfd.readouterr()
    with pytest.raises(Exception, match="^Failed to compile BPF module"):  # bcc raises bare Exception
        bcc.BPF(text=src.text.encode(), cflags=bad)
    err = capfd.readouterr().err
    assert "struct tlt_event.sport differs from probes/event_layout.py" in err, err
    assert err.count("differs from probes/event_layout.py") == 1, err  # that field, and only it
    bcc.BPF(text=src.text.encode(), cflags=src.cflags).cleanup()  # and the true layout loads
    assert "differs from probes/event_layout.py" not in capfd.readouterr().err


@pytest.mark.parametrize("mode", ["stream", "aggregate"])
def test_the_start_up_offset_check_leaves_no_connection_of_the_tracer(mode):
    """The tracer's own loopback connection (probes/offset_check.py) is not the workload's:
    none of its events, the reads and writes that carry only a generation included, may
    become a connection of the trace (its server side's first read used to come up as an
    open connection born before the trace, owned by the tracer, forever)."""
    import os
    import time

    from tcplife_trace.live import LiveSession
    with LiveSession(Settings(mode=mode)) as s:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            s.poll(50)
    assert s.report["startup_check_events"], "the offset check did not run"
    ours = [lc for lc in s.still_open if lc.owner_pid == os.getpid()]
    assert ours == [], [(lc.conn_id, lc.state, lc.role) for lc in ours]


def test_no_loopback_for_the_offset_check_is_a_notice_not_a_traceback(tmp_path):
    """In a network namespace whose lo is down the tracer's own check connection cannot be
    made: the trace starts all the same and a notice says the offsets were not checked (an
    OSError from bind/connect came out of LiveSession() as a traceback)."""
    import subprocess
    import sys
    name = f"tltnolo{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        code = ("from tcplife_trace.live import LiveSession\n"
                "with LiveSession() as s:\n"
                "    s.poll(10)\n"
                "print('\\n'.join(s.notices))\n")
        r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not checked on a connection of the tracer's own" in r.stdout
