"""`tcplife-trace top`: the live view driven in a real terminal (tmux: send-keys, capture-pane)
during a known loopback workload, the plain print when stdout is not a terminal, and the model
and screen layout without a kernel (every terminal size, every key)."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tcplife_trace.analysis.lifecycle import Lifecycle, Transition
from tcplife_trace.probes.filters import Filters
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.top import ViewState, plain_lines, screen_lines
from tcplife_trace.top_model import TopModel, parse_filter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, ".venv", "bin", "tcplife-trace")
if not os.path.exists(TOOL):
    TOOL = shutil.which("tcplife-trace") or TOOL
N, M, H = 30, 12, 5  # port A: N closed by the client first, H held open; port B: M aborted by the server

# A bounded loopback workload on two known ports; every socket has a timeout, every loop a count.
WORKLOAD = r'''
import socket, struct, sys
A, B, N, M, H = map(int, sys.argv[1:6])
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(128); s.settimeout(10); return s
la, lb = listener(A), listener(B)
def pair(ls, port):
    c = socket.create_connection(("127.0.0.1", port), timeout=10); a, _ = ls.accept(); a.settimeout(10)
    return c, a
for _ in range(N):
    c, a = pair(la, A); c.close(); a.recv(1); a.close()
for _ in range(M):
    c, a = pair(lb, B); a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); a.close()
    try:
        c.recv(1)
    except OSError:
        pass
    c.close()
held = [pair(la, A) for _ in range(H)]
print("HELD", flush=True)
sys.stdin.readline()
for c, a in held:
    c.close(); a.recv(1); a.close()
la.close(); lb.close()
print("DONE", flush=True)
'''


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Workload:
    def __init__(self, a, b):
        self.p = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(a), str(b), str(N), str(M), str(H)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "HELD"

    def finish(self):
        out, _ = self.p.communicate("\n", timeout=30)
        assert out.strip() == "DONE"


class Tmux:
    """A tmux server of its own (its own socket), one session running `command` then saying its exit status."""

    def __init__(self, command: str, width: int, height: int, env: dict | None = None):
        self.sock = f"tcplife-top-{os.getpid()}-{time.monotonic_ns()}"
        envs = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        script = f"env {envs} {command}; echo TOP_EXIT=$?; sleep 120"
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), "sh", "-c", script)

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def keys(self, *keys, literal=False) -> None:
        self.tmux("send-keys", "-t", "top", *(["-l", "--"] if literal else []), *keys)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if re.search(pattern, text, re.M):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen within {timeout} s:\n{text}")
            time.sleep(0.3)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)
        where = os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.sock)
        if os.path.exists(where):  # (its socket file stays behind the server)
            os.unlink(where)


def row(screen: str, name: str) -> list[str] | None:
    """The numbers of the table row named `name` (the first one on the screen)."""
    for line in screen.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return parts[1:]
    return None


def port_rows_are(screen: str, a: int, b: int) -> bool:
    # LOCAL PORT rows: NEW CLOSED OPEN RST REFUSED TIMEOUT CHURN/s
    return (row(screen, str(a)) or [])[:6] == [str(N + H), str(N), str(H), "0", "0", "0"] and \
        (row(screen, str(b)) or [])[:6] == [str(M), str(M), "0", str(M), "0", "0"]


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None and os.environ.get("TCPLIFE_TRACE_REQUIRE_PRIVILEGED") != "1",
                                reason="tmux is not installed (scripts/provision.sh --test-tools)")


@pytest.mark.privileged
@needs_tmux
def test_screen_shows_the_workload_a_filter_narrows_it_q_exits_with_the_summary():
    a, b = free_ports(2)
    term = Tmux(f"{TOOL} top -L {a},{b} --refresh 0.5", 80, 24)
    work = None
    try:
        term.wait_for(r"^tcplife-trace top .*sort churn")
        term.wait_for(r"^sockets: ")  # the first look at every namespace is done
        work = Workload(a, b)
        deadline = time.monotonic() + 20
        while not port_rows_are(screen := term.screen(), a, b):
            assert time.monotonic() < deadline, f"the workload's counts are not on the screen:\n{screen}"
            time.sleep(0.3)
        assert re.search(rf"^totals: new {N + H + M}  closed {N + M}  open {H}  resets {M}  refused 0  timeouts 0",
                         screen, re.M), screen
        assert "Traceback" not in screen
        # sort by open connections (port A first), pause (the picture stays), go on
        term.keys("s")
        screen = term.wait_for(r"^tcplife-trace top .*sort open")
        ports = [x.split()[0] for x in screen.splitlines() if x.split() and x.split()[0] in (str(a), str(b))]
        assert ports == [str(a), str(b)], screen
        term.keys("p")
        term.wait_for(r"\[PAUSED\]")
        term.keys("p")
        term.wait_for(r"^tcplife-trace top .*sort open\s*$")
        # the filter box, with the command line's keys: port A only
        term.keys("/")
        term.keys(f"-L {a}", literal=True)
        term.wait_for(rf"^filter .*: -L {a}_")
        term.keys("Enter")
        screen = term.wait_for(rf"filter -L {a}$|filter -L {a} ")
        screen = term.wait_for(rf"^totals: new {N + H}  closed {N}  open {H}  resets 0")
        assert row(screen, str(b)) is None, screen
        assert (row(screen, str(a)) or [])[:3] == [str(N + H), str(N), str(H)], screen
        # a filter the box refuses: one line, the view goes on
        term.keys("/")
        term.keys("C-u")  # (not a character: ignored)
        term.keys(" -x", literal=True)
        term.keys("Enter")
        term.wait_for(r"^filter refused: unknown filter '-x'")
        term.keys("c")  # clear: port B is back
        term.wait_for(rf"^{b} ")
        work.finish()
        work = None
        term.keys("q")
        screen = term.wait_for(r"^TOP_EXIT=\d+", timeout=30)
        assert "TOP_EXIT=0" in screen, screen
        # the usual exit summary
        assert re.search(rf"s traced, \d+ connections seen, \d+ closed", screen), screen
        assert f"passive_close {N + H}" in screen and f"local_abort {M}" in screen, screen
        assert "Traceback" not in screen
    finally:
        if work is not None:
            work.p.kill()
        term.close()


@pytest.mark.privileged
@needs_tmux
def test_40x10_no_color_and_a_tiny_terminal_never_a_traceback():
    a, = free_ports(1)
    term = Tmux(f"{TOOL} top -L {a} --refresh 0.5", 40, 10, env={"NO_COLOR": "1"})
    try:
        screen = term.wait_for(r"^totals: new 0")
        lines = screen.rstrip("\n").split("\n")
        assert len(lines) <= 10 and all(len(x) <= 40 for x in lines), screen
        assert lines[0].startswith("tcplife-trace top"), screen
        assert lines[-1].startswith("q quit"), screen
        # NO_COLOR: no colour escapes (bold and reverse video are not colours)
        coloured = term.screen(escapes=True)
        assert not re.search(r"\x1b\[[0-9;]*(?:3[0-8]|4[0-8]|9[0-7])[;m]", coloured), repr(coloured)
        term.tmux("resize-window", "-t", "top", "-x", "20", "-y", "5")
        term.wait_for(r"too small")
        term.tmux("resize-window", "-t", "top", "-x", "40", "-y", "10")
        term.wait_for(r"^tcplife-trace top")
        term.keys("q")
        screen = term.wait_for(r"^TOP_EXIT=\d+", timeout=30)
        assert "TOP_EXIT=0" in screen and "Traceback" not in screen, screen
    finally:
        term.close()


@pytest.mark.privileged
def test_plain_periodic_print_when_stdout_is_not_a_terminal_and_record_alongside(tmp_path):
    a, b = free_ports(2)
    rec = tmp_path / "top.arrow"
    top = subprocess.Popen([TOOL, "top", "-L", f"{a},{b}", "--refresh", "1", "--duration", "30", "--record", str(rec)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        first = top.stdout.readline()  # the first block: tracing and the first look are done
        assert re.match(r"\d\d:\d\d:\d\d up \d+s: new \d+", first), first
        work = Workload(a, b)
        work.finish()
        want = {f"  port {a}: new {N + H} closed {N + H} open 0 resets 0 refused 0 timeouts 0",
                f"  port {b}: new {M} closed {M} open 0 resets {M} refused 0 timeouts 0"}
        deadline, seen = time.monotonic() + 20, []
        while want:
            line = top.stdout.readline()
            seen.append(line)
            want = {w for w in want if not line.startswith(w)}
            assert line and time.monotonic() < deadline, "".join(seen[-40:])
        top.send_signal(2)
        out, err = top.communicate(timeout=30)
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0, err
    assert "\x1b" not in "".join(seen) + out
    assert re.search(r"s traced, \d+ connections seen", err) and "Traceback" not in err, err
    # --record alongside: every connection of the workload is in the recording
    import io

    import pandas as pd
    csv = subprocess.run([TOOL, "analyze", str(rec), "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert csv.returncode == 0, csv.stderr
    df = pd.read_csv(io.StringIO(csv.stdout))
    ended = df[df.role == "passive"].groupby(["lport", "end_reason"]).size().to_dict()
    assert ended == {(a, "passive_close"): N + H, (b, "local_abort"): M}, ended


@pytest.mark.privileged
def test_a_screen_that_cannot_be_written_holds_nothing_up(tmp_path):
    """The terminal stops reading (a stalled SSH link): the screen thread blocks in its write to
    the tty, and the consumer still follows every connection of the workload meanwhile."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    a, b = free_ports(2)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))  # big frames fill the tty soon
    err_path = tmp_path / "top.err"
    with open(err_path, "w") as err:
        top = subprocess.Popen([TOOL, "top", "-L", f"{a},{b}", "--refresh", "0.2"], stdin=slave, stdout=slave,
                               stderr=err, start_new_session=True)
    os.close(slave)

    def read_for(seconds: float, until: bytes | None = None) -> bytes:
        got, end = b"", time.monotonic() + seconds
        while time.monotonic() < end and (until is None or until not in got):
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    got += os.read(master, 65536)
                except OSError:
                    break
        return got
    try:
        assert b"totals:" in read_for(30, b"totals:"), err_path.read_text()
        # stop reading: the screen's writes fill the tty and block
        deadline = time.monotonic() + 20
        while "tty_write" not in open(f"/proc/{top.pid}/stack").read():
            assert time.monotonic() < deadline, "the screen never blocked on the terminal"
            time.sleep(0.2)
        work = Workload(a, b)
        work.finish()
        time.sleep(2)  # (the consumer's snapshot: it goes on while the screen waits)
        assert "tty_write" in open(f"/proc/{top.pid}/stack").read()  # the screen is still stuck
        read_for(1)
        os.write(master, b"q")
        read_for(30)
        assert top.wait(timeout=30) == 0
    finally:
        if top.poll() is None:
            top.kill()
        os.close(master)
    err = err_path.read_text()
    assert f"passive_close {N + H}" in err and f"local_abort {M}" in err, err
    assert re.search(r"events: (\d+) received of \1 emitted; lost 0;", err), err
    assert "Traceback" not in err


# -- without a kernel -------------------------------------------------------------------------------
def _lc(cid, role, lport, rport, pid=100, comm="app", family=4, raddr="10.0.0.2"):
    lc = Lifecycle(cid, cid, role, 0, True)
    lc.family, lc.laddr, lc.lport, lc.raddr, lc.rport = family, "10.0.0.1", lport, raddr, rport
    lc.owner_pid, lc.owner_comm = pid, comm
    return lc


def _model():
    clock = [1000.0]
    m = TopModel(clock=lambda: clock[0], home_of=lambda pid: "docker 0123456789ab" if pid == 200 else "/")
    births = {"active": (S.CLOSE, S.SYN_SENT), "passive": (S.LISTEN, S.SYN_RECV)}
    conns = [_lc(i, "active", 40000 + i, 5432, raddr="10.0.0.9") for i in range(6)] + \
            [_lc(10 + i, "passive", 8080, 50000 + i, pid=200, comm="server", family=6) for i in range(4)]
    for lc in conns:
        old, new = births[lc.role]
        m.transition(Transition(lc, 0, int(old), int(new), None, lc.owner_pid, b"", ""))
        m.transition(Transition(lc, 0, int(old), int(new), None, lc.owner_pid, b"", ""))  # counted once
    reasons = ["active_close", "refused", "timeout", "reset_by_peer", "active_close"]
    for lc, why in zip(conns[:5], reasons):
        lc.end_reason = why
        m.closed(lc)
    clock[0] += 2
    m.sockets_seen({"ESTABLISHED": 4, "TIME_WAIT": 10})
    m.sockets_seen({"ESTABLISHED": 5, "SYN_SENT": 1})
    return m, conns


def test_model_counts_by_peer_port_process_and_the_filter_box_narrows():
    m, conns = _model()
    snap = m.snapshot(open_lifecycles=[conns[5]] + conns[6:], status={"events_per_s": 10})
    assert snap.totals == {"new": 10, "closed": 5, "open": 5, "resets": 1, "refused": 1, "timeouts": 1}
    peer = {r.name: r for r in snap.rows("peer")}
    assert (peer["10.0.0.9:5432"].new, peer["10.0.0.9:5432"].closed, peer["10.0.0.9:5432"].open) == (6, 5, 1)
    assert peer["10.0.0.9:5432"].churn == pytest.approx(5 / 2)
    ports = {r.name: r for r in snap.rows("port")}
    assert ports["8080"].open == 4 and ports["(client)"].refused == 1
    procs = [r.name for r in snap.rows("process", sort="open")]
    assert procs == ["server 200", "app 100"]
    assert snap.sockets_trend == {"ESTABLISHED": [4, 5], "TIME_WAIT": [10, 0], "SYN_SENT": [0, 1]}
    assert snap.filtered_totals(parse_filter("-L 8080"))["new"] == 4
    assert snap.filtered_totals(parse_filter("-D 5432 -4"))["closed"] == 5
    assert snap.filtered_totals(parse_filter("-6"))["open"] == 4
    assert snap.filtered_totals(parse_filter("-p 100,7"))["timeouts"] == 1
    assert [r.name for r in snap.rows("peer", parse_filter("-p 200"))] == ["10.0.0.2"]
    homes = {r.name: (r.new, r.open) for r in snap.rows("container")}
    assert homes == {"docker 0123456789ab": (4, 4), "/": (6, 1)}


@pytest.mark.parametrize("text, why", [("-x", "unknown filter"), ("-L", "needs a value"), ("-L 0", "not a port"),
                                       ("-p abc", "not a pid"), ("-4 -6", "exclude"), ("-L '8080", "cannot read")])
def test_filter_box_refuses_bad_input_in_one_line(text, why):
    with pytest.raises(ValueError, match=why):
        parse_filter(text)
    assert parse_filter("") == Filters()


def test_every_terminal_size_and_key_draws_without_an_error():
    m, conns = _model()
    snap = m.snapshot(open_lifecycles=conns[5:], status={"lost": 3, "map_fill": 0.5})
    vs = ViewState()
    for keys in ("", "s", "sS", "g", "gg", "ggg", "gggg", "h", "/-L 8080\r", "/-q\r", "/abc\x1b", "c"):
        for ch in keys:
            assert vs.key(ch)
        for w, h in ((1, 1), (20, 5), (29, 6), (30, 6), (40, 10), (80, 24), (200, 60)):
            for s in (snap, None):
                lines = screen_lines(s, vs, w, h)
                assert len(lines) <= h and all(len(t) <= w for t, _ in lines)
    assert not vs.key("q")
    lines = [t for t, _ in screen_lines(snap, ViewState(), 80, 24)]
    assert lines[0].startswith("tcplife-trace top") and lines[-1].startswith("q quit")
    assert any(t.startswith("totals: new 10  closed 5  open 5") for t in lines)
    plain = plain_lines(snap)
    assert plain[0].split(": ", 1)[1].startswith("new 10  closed 5  open 5  resets 1  refused 1  timeouts 1")
    assert "  port 8080: new 4 closed 0 open 4 resets 0 refused 0 timeouts 0 churn/s 0.0" in plain
