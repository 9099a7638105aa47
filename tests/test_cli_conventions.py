"""The CLI as users of bcc's tools expect it: -s/--csv, serve's flags, hints that name a command
that works when typed."""
import csv
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from test_cli import EXE, one_connection, run_cli, traced
from test_metrics import samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.privileged
def test_csv_is_a_header_then_one_row_per_transition():
    rc, out, err, (srv, cpid) = traced(["--duration", "3", "-s", "-4", "--poll-interval", "0"], one_connection)
    assert rc == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    assert list(rows[0]) == ["time", "ts_ns", "conn_id", "pid", "comm", "owner_source", "cur_pid", "cur_comm",
                             "role", "family", "laddr", "lport", "raddr", "rport", "netns", "oldstate",
                             "newstate", "ms", "note"]
    mine = [r for r in rows if str(srv.port) in (r["lport"], r["rport"]) and r["pid"] == str(cpid)]
    assert [(r["oldstate"], r["newstate"]) for r in mine] == [
        ("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
    assert mine[0]["ms"] == "" and float(mine[1]["ms"]) > 0  # unknown is empty, never 0
    assert "lost 0" in err  # the summary stays text on stderr


@pytest.mark.privileged
def test_csv_lifecycles_carry_the_states_as_json_cells():
    rc, out, err, (srv, cpid) = traced(["--duration", "3", "-s", "--lifecycles", "-4", "--poll-interval", "0"],
                                       one_connection)
    assert rc == 0, err
    rows = [r for r in csv.DictReader(out.splitlines()) if r["pid"] == str(cpid) and r["rport"] == str(srv.port)]
    assert len(rows) == 1
    assert json.loads(rows[0]["path"]) == ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE",
                                           "TIME_WAIT"]
    assert set(json.loads(rows[0]["state_ms"])) == {"SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"}


def test_csv_and_json_exclude_each_other():
    r = run_cli(["-s", "--json", "--duration", "1"])
    assert r.returncode == 2 and r.stderr.strip() == (
        "tcplife-trace: error: --json and -s/--csv exclude each other (see --help)")


@pytest.mark.privileged
def test_serve_takes_max_conns_ring_pages_report_and_strict(tmp_path):
    bad = run_cli(["serve", "--ring-pages", "3", "--duration", "1"])
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "power of two" in bad.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    report = tmp_path / "serve.json"
    agent = subprocess.Popen([EXE, "serve", "--metrics-port", str(mport), "--max-conns", "2048", "--ring-pages",
                              "64", "--report", str(report), "--strict", "--duration", "4", "--poll-interval", "0"],
                             stderr=subprocess.PIPE, text=True)
    assert "metrics on" in agent.stderr.readline()
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        s = samples(r.read().decode())
    err = agent.communicate(timeout=60)[1]
    assert s[("tcplife_conn_map_capacity", ())] == 2048
    assert s[("tcplife_ring_buffer_size_bytes", ())] == 64 * 4096 * 2  # and the folded records ring, as large
    summary = json.loads(report.read_text())
    lost = summary["events_lost"] + summary["conn_map_full"] + summary["evictions"]
    assert agent.returncode == (1 if lost else 0), err  # --strict: 1 exactly when something was lost
    assert ("--strict: events were lost" in err) == bool(lost)


@pytest.mark.privileged
def test_the_recordings_hint_is_a_command_that_works(tmp_path):
    rec = tmp_path / "t.arrow"
    for env_path in (os.environ["PATH"], "/usr/bin:/bin"):  # with the setup's link on PATH, and without
        r = subprocess.run([EXE, "--duration", "1", "--poll-interval", "0", "--record", str(rec)],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": env_path})
        assert r.returncode == 0, r.stderr
        (hint,) = [ln.split("read it with: ", 1)[1] for ln in r.stderr.splitlines() if "read it with: " in ln]
        a = subprocess.run(shlex.split(hint), capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PATH": env_path}, cwd=tmp_path)
        assert a.returncode == 0, (hint, a.stderr)
        assert "connections" in a.stdout
        rec.unlink()


@pytest.mark.privileged
def test_doctor_records_what_it_traced(tmp_path):
    rec = tmp_path / "doctor.arrow"
    proc = subprocess.Popen([EXE, "doctor", "--duration", "3", "--interval", "1", "--record", str(rec), "-4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "snapshot taken" not in (line := proc.stderr.readline()):
        assert line, "doctor ended before tracing"
    srv, cpid = one_connection()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 1), err
    (hint,) = [ln for ln in err.splitlines() if ln.startswith("tcplife-trace doctor: recorded ")]
    assert "socket snapshots to" in hint and str(rec) in hint
    a = subprocess.run(shlex.split(hint.split("read it with: ", 1)[1]) + ["--format", "csv", "-D", str(srv.port)],
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    rows = [r for r in csv.DictReader(a.stdout.splitlines()) if r["pid"] == str(cpid)]
    assert len(rows) == 1 and rows[0]["end_reason"] == "active_close", a.stdout
    from tcplife_trace.recording import load
    assert len(load([str(rec)]).snapshots()) >= 2  # the seed and the looks every second
    r = run_cli(["doctor", "--duration", "0", "--record", str(tmp_path / "x.arrow")])
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--record needs a trace" in r.stderr
    assert not (tmp_path / "x.arrow").exists()


@pytest.mark.privileged
def test_report_dash_ends_the_json_lines_with_the_summary():
    rc, out, err, (srv, cpid) = traced(["--duration", "3", "--json", "--lifecycles", "-4", "--report", "-",
                                        "--poll-interval", "0"], one_connection)
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]  # every line of stdout is JSON
    assert [r["type"] for r in recs][-1] == "summary" and {r["type"] for r in recs[:-1]} == {"lifecycle"}
    assert recs[-1] == json.loads(err.strip().splitlines()[-1])  # the same summary --json puts on stderr
    assert any(r["pid"] == cpid and r["rport"] == srv.port for r in recs[:-1])
    assert not os.path.exists("-")
