"""The command line: bad input gives one clear line and exit 2; a real trace prints and summarises."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tcplife_trace.cli import main
from tcplife_trace.probes import bcc_import, tracefs
from tcplife_trace.probes.tracefs import TracefsError

from tracing import Server, client

EXE = shutil.which("tcplife-trace") or os.path.join(os.path.dirname(sys.executable), "tcplife-trace")


def traced(args, workload, stdout=subprocess.PIPE):
    """Start the CLI, wait until it says it is tracing, run workload(), let the trace end.

    Returns (exit status, stdout, stderr, what workload returned)."""
    proc = subprocess.Popen([EXE, *args], stdout=stdout, stderr=subprocess.PIPE, text=True)
    early = []
    while True:
        line = proc.stderr.readline()
        early.append(line)
        if not line or "tracing TCP state changes" in line:
            break
    result = workload()
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, "".join(early) + err, result


def one_connection(family="4"):
    srv = Server(family, "normal")
    cpid, _ = client(family, srv.port)
    srv.wait()
    return srv, cpid


def run_cli(args, **kw):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("args,needle", [
    (["-p", "abc"], "'abc' is not a pid"),
    (["-L", "80,99999"], "'99999' is not a port"),
    (["-4", "-6"], "-4 and -6 exclude each other"),
    (["--duration", "-1"], "--duration"),
    (["--bogus"], "No such option"),
    (["--ring-pages", "3"], "power of two"),
    (["--threshold", "close_wait=3"], "unknown threshold 'close_wait'"),
    (["--threshold", "close_wait_age_s=soon"], "close_wait_age_s takes a float"),
    (["--kernel-mode", "aggregate"], "the per-transition view (add --lifecycles) needs every transition"),
    (["--lifecycles", "--kernel-mode", "aggregate", "--record", "/nonexistent/x"], "--record needs every"),
])
def test_bad_flags_one_line_exit_2(args, needle):
    r = run_cli(args + ["--duration", "1"] if "--duration" not in args else args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("tcplife-trace: error:"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.privileged  # (dropping to uid 65534 takes root)
def test_not_privileged_one_line_exit_2():
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop privileges for this test")
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        "--bounding-set=-all", EXE, "--duration", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("tcplife-trace: error: tracing needs root (or CAP_BPF and CAP_PERFMON): "
                                "run it with sudo")


def test_bcc_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` fail
    monkeypatch.setattr(bcc_import, "DIST_DIRS", ("/nonexistent/bcc",))
    with pytest.raises(bcc_import.BccMissing, match="apt install python3-bpfcc"):
        bcc_import.import_bcc()


def test_pypi_bcc_impostor_is_named(monkeypatch, tmp_path):
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("lattice = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = sys.modules.pop("bcc", None)
    try:
        with pytest.raises(bcc_import.BccMissing, match="not iovisor bcc"):
            bcc_import.import_bcc()
    finally:
        sys.modules.pop("bcc", None)
        if real is not None:
            sys.modules["bcc"] = real


def test_tracefs_missing_message(monkeypatch, tmp_path):
    monkeypatch.setattr(tracefs, "TRACEFS_DIRS", (str(tmp_path / "nope"),))
    with pytest.raises(TracefsError, match="mount -t tracefs tracefs /sys/kernel/tracing"):
        tracefs.find_tracefs()


def test_missing_spine_tracepoint(tmp_path):
    (tmp_path / "events").mkdir()
    with pytest.raises(TracefsError, match="no tracepoint sock/inet_sock_set_state"):
        tracefs.probe(str(tmp_path))


def test_missing_optional_tracepoints_degrade_with_notices(tmp_path):
    fmt = tmp_path / "events" / "sock" / "inet_sock_set_state"
    fmt.mkdir(parents=True)
    (fmt / "format").write_text("\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n")
    present, notices = tracefs.probe(str(tmp_path))
    assert list(present) == [("sock", "inet_sock_set_state")]
    assert len(notices) == len(tracefs.OPTIONAL) and all("missing on this kernel" in n for n in notices)


def test_help_is_not_an_error():
    assert main(["--help"]) == 0


@pytest.mark.privileged
def test_trace_json_and_summary():
    rc, out, err, (srv, cpid) = traced(["--duration", "3", "--json", "-4"], one_connection)
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in recs if srv.port in (r["lport"], r["rport"])]
    steps = [(r["oldstate"], r["newstate"]) for r in mine if r["pid"] == cpid]
    assert steps == [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
                     ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
    assert mine[-1]["type"] == "transition"
    assert any(r["note"] == "TIME_WAIT" for r in mine)
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["type"] == "summary" and summary["events_lost"] == 0
    assert summary["closed"] >= 3
    assert "lost 0" in err


@pytest.mark.privileged
def test_lifecycles_text_and_still_open():
    def workload():
        srv, cpid = one_connection("6")
        return srv, cpid, Server("4", "hold")  # the held one stays open past the end of the trace
    rc, out, err, (srv, cpid, held) = traced(["--duration", "3", "--lifecycles", "-w"], workload)
    held.proc.kill()
    held.proc.wait()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:9] == ["PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB", "MS"]
    client_line = [ln for ln in lines if ln.split()[0] == str(cpid)]
    assert len(client_line) == 1
    f = client_line[0].split()
    assert f[2] == "::1" and f[5] == str(srv.port) and f[9] == "active_close+TW"
    assert "SYN_SENT:" in client_line[0] and "TIME_WAIT" in client_line[0]
    assert any(ln.split()[9] == "open" and str(held.port) in ln.split() for ln in lines[1:])
    assert "still open" in err and "lost 0" in err
    assert "records (kernel aggregation" in err  # --lifecycles folds in the kernel; the held one came from its map


@pytest.mark.privileged
def test_lost_events_are_counted_and_strict_fails():
    # a 1-page ring buffer read by a consumer at the lowest priority cannot keep up with a burst
    # of connections from two processes: losses must be counted and said, not hidden
    def workload():
        bursts = [subprocess.Popen([sys.executable, "-c", BURST]) for _ in range(2)]
        return [b.wait(timeout=30) for b in bursts]
    rc, _, err, statuses = traced(["--duration", "4", "--ring-pages", "1", "--nice", "19", "--strict",
                                   "--lifecycles"], workload, stdout=subprocess.DEVNULL)
    assert statuses == [0, 0]
    assert rc == 1, err
    summary = [ln for ln in err.splitlines() if "received of" in ln][0]  # events, or records when aggregated
    lost = int(summary.split("lost ")[1].split()[0])
    assert lost > 0
    assert "warning: " in err and "events lost in the kernel" in err  # said while tracing
    assert "--strict: events were lost" in err


BURST = """
import socket
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(512)
port = ls.getsockname()[1]
for _ in range(2000):
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    a, _ = ls.accept()
    c.close(); a.close()
ls.close()
"""


@pytest.mark.privileged
def test_runs_with_no_kernel_headers_anywhere():
    """Hide every kernel header tree (a private mount namespace) and trace anyway."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed for this test")
    script = ("for d in /lib/modules /usr/src; do [ -d $d ] && mount -t tmpfs none $d; done; "
              "ls -A /lib/modules /usr/src; exec \"$0\" --duration 1")
    r = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script, EXE],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"tracing TCP state changes ({1 + len(tracefs.OPTIONAL)} tracepoints" in r.stderr
    assert "lost 0" in r.stderr


@pytest.mark.privileged
def test_record_then_load_gives_the_same_transitions(tmp_path):
    from tcplife_trace import load
    path = tmp_path / "trace.arrow"
    rc, out, err, (srv, cpid) = traced(["--duration", "3", "--json", "--record", str(path)],
                                       one_connection)
    assert rc == 0, err
    live = [json.loads(line) for line in out.splitlines()]
    live = [r for r in live if srv.port in (r["lport"], r["rport"])]
    rec = load(str(path))
    assert rec.warnings == [] and rec.end["events_lost"] == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    df = rec.transitions
    df = df[(df.lport == srv.port) | (df.rport == srv.port)]
    assert len(df) == len(live) == 12  # listener 2, client 5, accepted child 5
    assert list(df.newstate.astype(str)) == [r["newstate"] for r in live]
    for ms, r in zip(df.ms_in_old, live, strict=True):
        assert (r["ms"] is None and ms != ms) or abs(ms - r["ms"]) < 1e-6
    client_rows = df[df.conn_id == df[df.cur_pid == cpid].conn_id.iloc[0]]
    assert list(client_rows.oldstate.astype(str)) == ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1",
                                                      "FIN_WAIT2"]


def _as_nobody(args):
    """Run the CLI as uid 65534 when we are root (so a 0700 directory of ours is unreadable to it)."""
    prefix = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, EXE, *args], capture_output=True, text=True, timeout=60, cwd="/")


def test_analyze_names_a_directory_it_cannot_read(tmp_path):
    import tempfile
    from synthetic import stream
    from test_recording import ROWS, write
    top = tempfile.mkdtemp(prefix="tcplife-unreadable-")
    try:
        os.chmod(top, 0o755)
        locked = os.path.join(top, "recordings")
        os.mkdir(locked)
        write(os.path.join(locked, "r.arrow"), stream(ROWS))
        os.chmod(locked, 0o000 if os.geteuid() else 0o700)
        r = _as_nobody(["analyze", locked])
        assert r.returncode == 2, r
        assert r.stderr.strip() == f"tcplife-trace: error: {locked}: cannot read the directory (Permission denied)"
    finally:
        os.chmod(os.path.join(top, "recordings"), 0o700)
        shutil.rmtree(top)


@pytest.mark.parametrize("where", ["/proc/x", "unwritable"])
def test_analyze_export_it_cannot_write_is_one_line(where):
    import tempfile
    from synthetic import stream
    from test_recording import ROWS, write
    top = tempfile.mkdtemp(prefix="tcplife-export-")  # readable by uid 65534, unlike tmp_path
    try:
        os.chmod(top, 0o755)
        rec = os.path.join(top, "r.arrow")
        write(rec, stream(ROWS))
        os.chmod(rec, 0o644)
        if where == "unwritable":
            os.mkdir(os.path.join(top, "ro"), mode=0o555)
            where = os.path.join(top, "ro", "x")
        r = _as_nobody(["analyze", rec, "--export", where])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tcplife-trace: error: cannot export into {where}: "), r.stderr
        assert r.stdout == ""
    finally:
        shutil.rmtree(top)
