"""Fleet analysis: recordings of several hosts, per-host partitions, pandas and Dask engines
giving the same frames."""
import pandas as pd
import pytest

from synthetic import ev
from tcplife_trace import fleet, load
from tcplife_trace.cli import main
from tcplife_trace.recording import RecordingError, RecordingWriter, header


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
    from distributed import LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        d = fleet.analyze(fleet_dir, "dask", scheduler=cluster.scheduler_address)
        assert len(cluster.scheduler.workers) == 1  # it ran there, and left the cluster up
    p = fleet.analyze(fleet_dir, "pandas")
    pd.testing.assert_frame_equal(p["lifecycles"], d["lifecycles"])


def test_a_bad_file_in_a_fleet_is_one_line_before_any_worker_starts(fleet_dir, capsys):
    (fleet_dir / "dc2" / "renamed.arrow").write_text("host,state\nweb1,LISTEN\n")
    assert main(["analyze", str(fleet_dir), "--engine", "dask", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "renamed.arrow: not a tcplife-trace recording" in err[0]
