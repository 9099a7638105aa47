"""`tcplife-trace analyze`: reports, data, exports and bad input."""
import json
import os

import pandas as pd
import pytest

from tcplife_trace import recording
from tcplife_trace.cli import main
from tcplife_trace.recording import RecordingWriter

from synthetic import stream
from test_offline_equivalence import ROWS


@pytest.fixture
def rec_path(tmp_path):
    p = tmp_path / "r.arrow"
    w = RecordingWriter(str(p), recording.header("none", 1_800_000_000_000_000_000))
    w.add(stream(ROWS))
    w.close({"events_lost": 0})
    return str(p)


def test_table_report(rec_path, capsys):
    assert main(["analyze", rec_path]) == 0
    out = capsys.readouterr().out
    assert "8 connections" in out and "refused 1" in out and "timeout 1" in out
    assert "open at the end of the recording (1)" in out
    assert "time in state" in out and "ESTABLISHED" in out


def test_json_and_filters(rec_path, capsys):
    assert main(["analyze", rec_path, "--format", "json", "-L", "8080"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["conn_id"] for r in doc["lifecycles"]} == {1, 2, 7}
    assert doc["recordings"][0]["end"]["events_lost"] == 0
    assert main(["analyze", rec_path, "--format", "json", "-p", str(201)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["conn_id"] for r in doc["lifecycles"]} == {2, 7}  # the worker's sockets


def test_time_window(rec_path, capsys):
    base = pd.Timestamp(1_800_000_000_000_000_000, unit="ns", tz="UTC")
    since = (base + pd.Timedelta(milliseconds=45)).isoformat()
    assert main(["analyze", rec_path, "--format", "csv", "--since", since]) == 0
    ids = set(pd.read_csv(__import__("io").StringIO(capsys.readouterr().out)).conn_id)
    assert ids == {1, 5, 6, 7, 8}  # ended after, or still open at, 45 ms


def test_export_parquet(rec_path, tmp_path, capsys):
    out = tmp_path / "frames"
    assert main(["analyze", rec_path, "--export", str(out), "--format", "csv"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["leaks.parquet", "lifecycles.parquet", "snapshots.parquet", "state_durations.parquet",
                     "summary.parquet", "transitions.parquet"]
    lk = pd.read_parquet(out / "leaks.parquet")
    assert list(lk.columns)[:3] == ["kind", "severity", "count"]
    lc = pd.read_parquet(out / "lifecycles.parquet")
    assert len(lc) == 8 and str(lc.time_wait.dtype) == "bool"


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"TIME SKADDR C-PID\n", "not a tcplife-trace recording"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, content, needle):
    p = tmp_path / "bad.arrow"
    p.write_bytes(content)
    assert main(["analyze", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(p) in err[0]


def test_truncated_file_warns_and_still_reports(rec_path, tmp_path, capsys):
    cut = tmp_path / "cut.arrow"
    data = open(rec_path, "rb").read()
    cut.write_bytes(data[:len(data) - 300])
    assert main(["analyze", str(cut)]) == 0
    io = capsys.readouterr()
    assert "warning" in io.err and str(cut) in io.err
    assert "connections" in io.out


def test_bad_time_is_a_usage_error(rec_path, capsys):
    assert main(["analyze", rec_path, "--since", "yesterday-ish"]) == 2
    assert "is not an ISO-8601 time" in capsys.readouterr().err


def test_many_findings_are_summed_up_in_the_table(tmp_path, capsys):
    """25 dead destinations, each refused three times: 25 findings, the table shows 20 and
    counts the rest; JSON has all of them."""
    rows, gen = [], 100
    for d in range(25):
        for k in range(3):
            gen += 1
            t = d * 10 + k
            rows += [(t, "S", gen, "CLOSE", "SYN_SENT", 500 + k, 0, 9000 + d),
                     (t + 0.1, "RR", gen),
                     (t + 0.2, "S", gen, "SYN_SENT", "CLOSE", 500 + k, 40000 + gen, 9000 + d),
                     (t + 0.3, "E", gen, 111, 40000 + gen, 9000 + d)]
    p = tmp_path / "refused.arrow"
    w = RecordingWriter(str(p), recording.header("none", 0))
    w.add(stream(rows))
    w.close({"events_lost": 0})
    assert main(["analyze", str(p)]) == 0
    out = capsys.readouterr().out
    assert "findings (25)" in out and out.count("syn_sent_storm: SYN_SENT storm to") == 20
    assert "... and 5 more: 5 syn_sent_storm (warning); all of them: --format json" in out
    assert main(["analyze", str(p), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["leaks"]) == 25
