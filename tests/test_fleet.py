"""Fleet analysis: recordings of several hosts, per-host partitions, pandas and Dask engines
giving the same frames."""
import os

import pandas as pd
import pytest

from synthetic import ev
from tcplife_trace import fleet, load
from tcplife_trace.cli import main
from tcplife_trace.recording import RecordingError, RecordingWriter, header, read_header


def client(gen, ms, port=8080, raddr="10.0.0.2"):
    r = {"raddr": raddr}
    return [(ms, "S", gen, "CLOSE", "SYN_SENT", 10, 0, port, r),
            (ms + 0.1, "S", gen, "SYN_SENT", "ESTABLISHED", 10, 40000 + gen, port, r),
            (ms + 5, "S", gen, "ESTABLISHED", "FIN_WAIT1", 10, 40000 + gen, port, r),
            (ms + 5.1, "S", gen, "FIN_WAIT1", "FIN_WAIT2", 0, 40000 + gen, port, r),
            (ms + 5.2, "S", gen, "FIN_WAIT2", "CLOSE", 0, 40000 + gen, port, r)]


def leak(gen, ms):
    return [(ms, "S", 1, "CLOSE", "LISTEN", 20, 5432, 0, {}),
            (ms + 1, "S", gen, "LISTEN", "SYN_RECV", 99, 5432, 50000 + gen, {}),
            (ms + 1.1, "S", gen, "SYN_RECV", "ESTABLISHED", 99, 5432, 50000 + gen, {}),
            (ms + 2, "IO", gen, 20, {}),
            (ms + 3, "S", gen, "ESTABLISHED", "CLOSE_WAIT", 99, 5432, 50000 + gen, {})]


def refused(gen, ms):
    r = {"raddr": "10.9.9.9"}
    return [(ms, "S", gen, "CLOSE", "SYN_SENT", 30, 0, 443, r), (ms + 0.2, "RR", gen, {}),
            (ms + 0.3, "S", gen, "SYN_SENT", "CLOSE", 0, 41000 + gen, 443, r), (ms + 0.4, "E", gen, 111, {})]


def write(path, host, rows, offset):
    w = RecordingWriter(str(path), header("none", offset, {"host": host}))
    w.add([ev(*r[:-1], **r[-1]) for r in rows])
    w.close({"stop_wall": (offset + 60 * 10**9) / 1e9, "events_lost": 0})


@pytest.fixture
def fleet_dir(tmp_path):
    d = tmp_path / "fleet"
    (d / "dc1").mkdir(parents=True)
    (d / "dc2").mkdir()
    write(d / "dc1" / "web1.arrow", "web1", [r for g in range(2, 8) for r in client(g, g * 10)]
          + leak(20, 100) + leak(21, 110), 1_800_000_000 * 10**9)
    write(d / "dc1" / "web2.arrow", "web2", [r for g in range(2, 6) for r in client(g, g * 7)]
          + [r for g in range(30, 34) for r in refused(g, g * 3)], 1_800_000_100 * 10**9)
    write(d / "dc2" / "db1.arrow", "db1", [r for g in range(2, 12) for r in client(g, g * 5, port=6379)],
          1_800_000_200 * 10**9)
    return d


def test_expand_directories_and_globs(fleet_dir):
    files = fleet.expand([str(fleet_dir)])
    assert [f.split("/")[-1] for f in files] == ["web1.arrow", "web2.arrow", "db1.arrow"]
    assert fleet.expand(str(fleet_dir / "dc1" / "*.arrow")) == files[:2]
    assert fleet.hosts(files) == {"web1", "web2", "db1"}
    with pytest.raises(RecordingError, match="no file matches"):
        fleet.expand(str(fleet_dir / "nothing*.arrow"))


def test_per_host_frames_and_findings(fleet_dir):
    out = fleet.analyze(fleet_dir, "pandas", thresholds=None)
    lc = out["lifecycles"]
    assert lc.groupby("host", observed=True).size().to_dict() == {"db1": 10, "web1": 9, "web2": 8}
    assert lc.conn_id.is_unique  # file index in the top bits
    lk = out["leaks"]
    got = {(r.host, r.kind) for r in lk.itertuples()}
    assert ("web1", "close_wait_leak") in got and ("web2", "syn_sent_storm") in got
    assert not any(h == "db1" for h, _ in got)
    cw = lk[(lk.host == "web1") & (lk.kind == "close_wait_leak")].iloc[0]
    assert cw["count"] == 2 and cw.owner_pid == 20
    # the same connections as loading the files together, host by host
    together = load(out["files"]).lifecycles().sort_values("conn_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(together, lc.drop(columns="host"), check_categorical=False)
    assert out["summary"].loc["ESTABLISHED", "count"] == 6 + 2 + 4 + 10  # clients and the leaked ones


def test_dask_engine_gives_the_same_frames(fleet_dir):
    p = fleet.analyze(fleet_dir, "pandas")
    d = fleet.analyze(fleet_dir, "dask", workers=2)
    for name in ("lifecycles", "state_durations", "leaks", "summary"):
        pd.testing.assert_frame_equal(p[name], d[name], obj=name)
    assert d["files"] == p["files"]


def test_analyze_cli_on_a_fleet_directory(fleet_dir, capsys):
    assert main(["analyze", str(fleet_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 recordings from 3 hosts" in out and "web1: WARNING close_wait_leak" in out
    assert main(["analyze", str(fleet_dir / "none*.arrow")]) == 2
    assert main(["analyze", str(fleet_dir), "--scheduler", "tcp://127.0.0.1:1"]) == 2  # needs --engine dask


def test_dask_engine_on_an_existing_scheduler(fleet_dir):
    """The per-host work ran on that scheduler's worker: its scheduler saw one host_frames
    task per file computed (a cluster of the call's own would have its own scheduler), in a
    worker process that is not this one; and the cluster is still up after."""
    import os

    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert "host_frames" not in cluster.scheduler.task_prefixes
        d = fleet.analyze(fleet_dir, "dask", scheduler=cluster.scheduler_address)
        done = cluster.scheduler.task_prefixes["host_frames"]
        assert done.state_counts["memory"] == len(d["files"]) == 3  # each file's task finished there
        assert done.all_durations["compute"] > 0                    # computed, by a worker that reported it
        (worker,) = cluster.scheduler.workers.values()
        assert worker.pid != os.getpid()
        assert len(cluster.scheduler.workers) == 1  # left up
    p = fleet.analyze(fleet_dir, "pandas")
    pd.testing.assert_frame_equal(p["lifecycles"], d["lifecycles"])


def test_a_bad_file_in_a_fleet_is_one_line_before_any_worker_starts(fleet_dir, capsys):
    (fleet_dir / "dc2" / "renamed.arrow").write_text("host,state\nweb1,LISTEN\n")
    assert main(["analyze", str(fleet_dir), "--engine", "dask", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "renamed.arrow: not a tcplife-trace recording" in err[0]


@pytest.mark.parametrize("engine", ["pandas", "dask"])
def test_multi_host_export_writes_every_frame_per_host(fleet_dir, tmp_path, capsys, engine):
    """summary.parquet lost its state column (the index) and transitions and snapshots were not
    written for a fleet; each frame read back from Parquet is the frame analyze computed."""
    import pyarrow.parquet as pq
    out = tmp_path / "out"
    assert main(["analyze", str(fleet_dir), "--export", str(out), "--engine", engine, "--workers", "1",
                 "--format", "csv"]) == 0
    capsys.readouterr()
    names = sorted(f for f in os.listdir(out))
    assert names == ["leaks.parquet", "lifecycles.parquet", "snapshots.parquet", "state_durations.parquet",
                     "summary.parquet", "transitions.parquet"]
    want = fleet.analyze(fleet_dir, "pandas", transitions=True)
    sm = pd.read_parquet(out / "summary.parquet")
    assert list(sm.columns)[:2] == ["state", "count"] and sm.state.notna().all()
    assert dict(zip(sm.state.astype(str), sm["count"])) == want["summary"]["count"].rename(str).to_dict()
    tr = pd.read_parquet(out / "transitions.parquet")
    per_host = tr.groupby("host").size().to_dict()
    assert per_host == {h: len(load(f).transitions) for h, f in zip(["web1", "web2", "db1"], want["files"])}
    assert tr.conn_id.is_unique is False and tr[["host", "conn_id"]].drop_duplicates().shape[0] == \
        len(want["lifecycles"])  # every connection's transitions, ids as in the lifecycles
    lc = pd.read_parquet(out / "lifecycles.parquet")
    assert set(tr.conn_id) == set(lc.conn_id)
    sn = pq.read_table(out / "snapshots.parquet")
    assert sn.schema.names[0] == "host" and sn.num_rows == 0  # (these recordings hold none)
    for name in ("lifecycles", "state_durations", "leaks", "snapshots", "transitions"):
        t = pq.read_table(out / f"{name}.parquet")
        assert t.schema.names[0] == "host" and str(t.schema.field("host").type) == "string", name
        assert (os.stat(out / f"{name}.parquet").st_mode & 0o777) == 0o600


def test_unreadable_header_is_one_line_not_a_host(fleet_dir, capsys):
    """read_header returned {} on any error: the file counted as host "" and switched analyze
    into fleet mode."""
    bad = fleet_dir / "dc1" / "web1-cut.arrow"
    bad.write_bytes(open(fleet_dir / "dc1" / "web1.arrow", "rb").read()[:40])  # cut inside the schema
    with pytest.raises(RecordingError, match="web1-cut.arrow"):
        fleet.hosts([str(bad)])
    with pytest.raises(RecordingError, match="web1-cut.arrow"):
        read_header(str(bad))
    assert main(["analyze", str(fleet_dir / "dc1" / "web1.arrow"), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_a_text_capture_of_unknown_host_is_not_this_machine(fleet_dir, tmp_path, capsys):
    import shutil
    import socket
    cap = tmp_path / "edge.txt"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "tcpstates-bpfcc-T-w.txt"), cap)
    assert fleet.hosts([str(cap)]) == {"unknown (edge.txt)"}
    from tcplife_trace.tcpstates_import import TextImport
    assert fleet.hosts([str(cap)], TextImport(host="edge1")) == {"edge1"}
    web1 = str(fleet_dir / "dc1" / "web1.arrow")
    assert main(["analyze", web1, str(cap)]) == 0
    out = capsys.readouterr().out
    assert "2 recordings from 2 hosts" in out and "unknown (edge.txt)" in out and socket.gethostname() not in out


def _client_recording(path, host, first_ms, offset=1_800_000_000 * 10**9):
    write(path, host, [r for g in range(2, 5) for r in client(g, first_ms + g * 10)], offset)
    return str(path)


def test_consecutive_recordings_of_one_host_are_one_timeline_and_said(tmp_path, capsys):
    a = _client_recording(tmp_path / "a.arrow", "web1", 0)
    b = _client_recording(tmp_path / "b.arrow", "web1", 5000)  # 4.97 s after a's last event
    assert main(["analyze", b, a]) == 0
    io = capsys.readouterr()
    said = [ln for ln in io.err.splitlines() if "web1:" in ln]
    assert len(said) == 2
    assert "2 recordings of this host analysed as one timeline, in time order: " + a in said[0]
    assert said[0].index(a) < said[0].index(b)
    assert "the 5.0 s between " + a + " and " + b + " were not recorded" in said[1]
    assert "6 connections" in io.out


def test_overlapping_recordings_of_one_host_are_said(tmp_path, capsys):
    a = _client_recording(tmp_path / "a.arrow", "web1", 0)
    b = _client_recording(tmp_path / "b.arrow", "web1", 15)  # the same seconds, recorded twice
    assert main(["analyze", a, b]) == 0
    err = capsys.readouterr().err
    assert f"web1: {a} and {b} overlap for " in err and "counted twice (once per file)" in err


@pytest.mark.privileged
def test_a_live_recording_is_named_by_host(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "r.arrow"
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "0.5", "--poll-interval", "0",
                        "--record", str(path), "--host", "web9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert read_header(str(path))["host"] == "web9" and fleet.hosts([str(path)]) == {"web9"}
    r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "0.5", "--host", "web9"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --record" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_rotated_recording_is_one_line_of_gaps(tmp_path):
    files = [_client_recording(tmp_path / f"r{i}.arrow", "web1", i * 2000) for i in range(4)]
    notes = [w for w in load(files).warnings if w.startswith("web1:")]
    assert len(notes) == 2 and "4 recordings of this host analysed as one timeline" in notes[0]
    assert "3 gaps between the files were not recorded, 5.9 s in all, the longest 2.0 s between" in notes[1]
