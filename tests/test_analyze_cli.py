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
    assert "10 connections" in out and "refused 1" in out and "timeout 1" in out
    assert "open at the end of the recording (2)" in out
    assert "time in state" in out and "ESTABLISHED" in out


def test_json_and_filters(rec_path, capsys):
    assert main(["analyze", rec_path, "--format", "json", "-L", "8080"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["conn_id"] for r in doc["lifecycles"]} == {1, 2, 7, 10}
    assert doc["recordings"][0]["end"]["events_lost"] == 0
    assert main(["analyze", rec_path, "--format", "json", "-p", str(201)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["conn_id"] for r in doc["lifecycles"]} == {2, 7, 9, 10}  # the worker's sockets (9: only written by it)


def test_time_window(rec_path, capsys):
    base = pd.Timestamp(1_800_000_000_000_000_000, unit="ns", tz="UTC")
    since = (base + pd.Timedelta(milliseconds=45)).isoformat()
    assert main(["analyze", rec_path, "--format", "csv", "--since", since]) == 0
    ids = set(pd.read_csv(__import__("io").StringIO(capsys.readouterr().out)).conn_id)
    assert ids == {1, 5, 6, 7, 8, 9, 10}  # ended after, or still open at, 45 ms


def test_export_parquet(rec_path, tmp_path, capsys):
    out = tmp_path / "frames"
    assert main(["analyze", rec_path, "--export", str(out), "--format", "csv"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["leaks.parquet", "lifecycles.parquet", "snapshots.parquet", "state_durations.parquet",
                     "summary.parquet", "transitions.parquet"]
    lk = pd.read_parquet(out / "leaks.parquet")
    assert list(lk.columns)[:3] == ["kind", "severity", "count"]
    lc = pd.read_parquet(out / "lifecycles.parquet")
    assert len(lc) == 10 and str(lc.time_wait.dtype) == "bool"


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


# --- exports: one schema, joinable keys, private files -------------------------------------

def _healthy(path):
    """A recording with no findings: two clean client connections, no snapshots."""
    rows = []
    for g in (1, 2):
        t = g * 10
        rows += [(t, "S", g, "CLOSE", "SYN_SENT", 100, 0, 443), (t + 0.1, "S", g, "SYN_SENT", "ESTABLISHED", 100,
                                                                 40000 + g, 443),
                 (t + 1, "S", g, "ESTABLISHED", "FIN_WAIT1", 100, 40000 + g, 443),
                 (t + 1.1, "S", g, "FIN_WAIT1", "FIN_WAIT2", 0, 40000 + g, 443),
                 (t + 1.2, "S", g, "FIN_WAIT2", "CLOSE", 0, 40000 + g, 443)]
    w = RecordingWriter(str(path), recording.header("none", 1_800_000_000_000_000_000))
    w.add(stream(rows))
    w.close({"events_lost": 0})
    return str(path)


def _export(src, out, capsys):
    assert main(["analyze", src, "--export", str(out), "--format", "csv"]) == 0
    capsys.readouterr()
    return {f[:-len(".parquet")]: out / f for f in os.listdir(out)}


def test_exports_with_and_without_findings_have_one_schema(tmp_path, capsys):
    """An empty frame (no findings, no snapshots) used to write Arrow null columns, and the
    dictionary index width followed the number of values: two exports did not concatenate."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_recorded_snapshots import _write
    busy = _export(_write(tmp_path / "busy.arrow"), tmp_path / "busy", capsys)
    calm = _export(_healthy(tmp_path / "calm.arrow"), tmp_path / "calm", capsys)
    assert sorted(busy) == sorted(calm) == ["leaks", "lifecycles", "snapshots", "state_durations", "summary",
                                            "transitions"]
    assert pq.read_metadata(busy["leaks"]).num_rows > 0 and pq.read_metadata(calm["leaks"]).num_rows == 0
    assert pq.read_metadata(busy["snapshots"]).num_rows > 0 and pq.read_metadata(calm["snapshots"]).num_rows == 0
    for name in busy:
        a, b = pq.read_table(busy[name]), pq.read_table(calm[name])
        assert a.schema.remove_metadata() == b.schema.remove_metadata(), name
        assert not any(pa.types.is_null(f.type) for f in a.schema), name
        assert pa.concat_tables([a, b]).num_rows == a.num_rows + b.num_rows
        for path in (busy[name], calm[name]):
            assert os.stat(path).st_mode & 0o777 == 0o600, path  # like the recording


def test_snapshots_join_lifecycles_on_their_keys(tmp_path, capsys):
    """snapshots had int64 ports and plain-string addresses, lifecycles UInt16 and categorical:
    an Arrow join on them failed. A socket the trace saw and the snapshot holds joins."""
    import pyarrow.parquet as pq
    from test_recorded_snapshots import MONO_TO_WALL, NS, socks
    rows = [(0.0, "S", 1, "CLOSE", "LISTEN", 200, 8080, 0),
            (5.0, "S", 2, "LISTEN", "SYN_RECV", 200, 8080, 50001),
            (5.1, "S", 2, "SYN_RECV", "ESTABLISHED", 200, 8080, 50001),
            (9.0, "S", 2, "ESTABLISHED", "CLOSE_WAIT", 0, 8080, 50001)]
    events = stream([(*r, {"laddr": "10.0.0.1", "raddr": "10.0.0.9" if r[7] else "0.0.0.0"}) for r in rows])
    p = tmp_path / "cw.arrow"
    w = RecordingWriter(str(p), recording.header("none", MONO_TO_WALL))
    w.add(events)
    w.add_snapshot(20_000_000, True, socks(("LISTEN", 8080, 0, 200, 20.0), ("CLOSE_WAIT", 8080, 50001, 200, 11.0)),
                   {"netns_names": {NS: "host"}})
    w.close({"events_lost": 0})
    files = _export(str(p), tmp_path / "out", capsys)
    keys = ["netns", "laddr", "lport", "raddr", "rport"]
    sn, lc = pq.read_table(files["snapshots"]), pq.read_table(files["lifecycles"])
    for k in keys:
        assert sn.schema.field(k).type == lc.schema.field(k).type, k
    joined = sn.join(lc.select([*keys, "conn_id", "end_reason"]), keys=keys, join_type="inner").to_pandas()
    # (a listener has no remote port: 0 in sock_diag's snapshot, NA in the trace's lifecycle)
    assert list(zip(joined["state"].astype(str), joined["conn_id"], joined["end_reason"])) == \
        [("CLOSE_WAIT", 2, "open")]
    # pandas, on the frames as read back
    m = pd.read_parquet(files["snapshots"]).merge(pd.read_parquet(files["lifecycles"]), on=keys)
    assert list(m["conn_id"]) == [2]


def test_an_export_replaces_an_earlier_one_and_is_private(tmp_path, rec_path, capsys):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "leaks.parquet").write_bytes(b"an older export")
    os.chmod(out / "leaks.parquet", 0o644)
    files = _export(rec_path, out, capsys)
    assert os.stat(files["leaks"]).st_mode & 0o777 == 0o600
    assert list(pd.read_parquet(files["leaks"]).columns)[:2] == ["kind", "severity"]
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary file left


def test_every_frame_column_is_declared(tmp_path):
    """frames/schema.py declares every column of every frame analyze gives: a column added to a
    frame without a declared type would export with whatever type its values suggest."""
    from test_recorded_snapshots import _write

    from tcplife_trace import analysis_report, load
    from tcplife_trace.frames import schema as frame_schema
    from tcplife_trace.probes.filters import Filters
    for f in (analysis_report.frames(load(_write(tmp_path / "a.arrow")), Filters()),
              analysis_report.frames(load(_healthy(tmp_path / "b.arrow")), Filters())):
        for name, df in f.items():
            assert list(df.columns) == [c for c, _ in frame_schema.columns(name)], name


# --- tcpstates text: the day, zone and host it does not say -------------------------------

def _capture(tmp_path, mtime="2026-11-20T10:00:00+00:00"):
    import shutil
    p = tmp_path / "capture.txt"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "tcpstates-bpfcc-T-w.txt"), p)
    t = pd.Timestamp(mtime).timestamp()
    os.utime(p, (t, t))
    return p


def test_tcpstates_import_says_what_it_assumed(tmp_path, capsys):
    p = _capture(tmp_path)
    assert main(["analyze", str(p), "--format", "json"]) == 0
    io = capsys.readouterr()
    said = [ln for ln in io.err.splitlines() if "does not say when or where" in ln]
    assert len(said) == 1 and str(p) in said[0]
    assert "2026-11-20 (from the file's modification time" in said[0] and "this machine's time zone" in said[0]
    assert "host unknown (give --host NAME)" in said[0]
    import socket
    head = json.loads(io.out)["recordings"][0]["header"]
    assert head["host"] is None and head["kernel"] is None  # not the analysing machine's
    assert socket.gethostname() not in json.dumps(head)


def test_tcpstates_import_with_date_zone_and_host(tmp_path, capsys):
    p = _capture(tmp_path)
    assert main(["analyze", str(p), "--format", "json", "--date", "2026-03-01", "--tz", "+05:30",
                 "--host", "edge-7"]) == 0
    io = capsys.readouterr()
    assert "does not say when or where" not in io.err
    doc = json.loads(io.out)
    assert doc["recordings"][0]["header"]["host"] == "edge-7"
    first = min(pd.Timestamp(r["start"]) for r in doc["lifecycles"])
    assert first == pd.Timestamp("2026-03-01T20:19:57+05:30")  # the capture's first line: 20:19:57
    assert main(["analyze", str(p), "--tz", "Europe/Paris", "--date", "2026-07-01"]) == 0
    out = capsys.readouterr().out
    assert "host unknown" in out and "times in Europe/Paris (UTC+02:00) (--tz)" in out


def test_tcpstates_capture_across_midnight(tmp_path):
    """HH:MM:SS going back by hours is the next day: the file's modification day is the last
    line's, the first lines are the day before."""
    from tcplife_trace import load
    from tcplife_trace.tcpstates_import import TextImport
    lines = open(os.path.join(os.path.dirname(__file__), "data", "tcpstates-bpfcc-T-w.txt")).read().splitlines()
    late = [lines[0]] + [ln.replace("20:19:57", "23:59:59", 1) for ln in lines[1:6]] + \
           [ln.replace("20:19:57", "00:00:01", 1).replace("20:19:58", "00:00:01", 1) for ln in lines[6:]]
    p = tmp_path / "night.txt"
    p.write_text("\n".join(late) + "\n")
    t = pd.Timestamp("2026-11-21T08:00:00Z").timestamp()
    os.utime(p, (t, t))
    rec = load(str(p), TextImport(tz=pd.Timestamp("2026-01-01", tz="UTC").tzinfo))
    starts = rec.lifecycles().start
    assert starts.min().date().isoformat() == "2026-11-20" and starts.max().date().isoformat() == "2026-11-21"
    assert rec.header["capture"]["midnights_crossed"] == 1


def test_a_refused_line_does_not_move_the_capture_past_midnight(tmp_path):
    """A stray line with a good time just after midnight but a port out of range is not
    understood: it must not count as the capture crossing midnight (every later line would
    have been put a day ahead)."""
    from tcplife_trace import load
    from tcplife_trace.tcpstates_import import TextImport
    lines = open(os.path.join(os.path.dirname(__file__), "data", "tcpstates-bpfcc-T-w.txt")).read().splitlines()
    body = [ln.replace("20:19:57", "23:59:58", 1).replace("20:19:58", "23:59:59", 1) for ln in lines[1:]]
    stray = body[0].replace("23:59:58", "00:00:05", 1).replace(" 8000 ", " 70000 ", 1)
    p = tmp_path / "stray.txt"
    p.write_text("\n".join([lines[0], body[0], stray, *body[1:]]) + "\n")
    rec = load(str(p), TextImport(date=pd.Timestamp("2026-11-20").date(), tz=pd.Timestamp("2026-01-01", tz="UTC").tzinfo))
    assert rec.header["capture"]["midnights_crossed"] == 0
    assert set(rec.lifecycles().start.dt.date.astype(str)) == {"2026-11-20"}


@pytest.mark.parametrize("args,needle", [
    (["--tz", "Mars/Olympus"], "--tz: 'Mars/Olympus' is not a time zone"),
    (["--date", "2026-13-01"], "--date: '2026-13-01' is not a day"),
    (["--host", " "], "--host: '' is not a host name"),
])
def test_bad_import_flags_are_one_line(tmp_path, capsys, args, needle):
    assert main(["analyze", str(_capture(tmp_path)), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_import_flags_without_a_text_capture(rec_path, capsys):
    assert main(["analyze", rec_path, "--host", "web1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the files is one" in err[0]
