"""Files the tracer writes when someone else got there first: a planted symlink, a refused start."""
import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from test_cli import EXE

NOBODY = 65534


def _sticky_dir(tmp_path):
    """A /tmp-like directory: world-writable, sticky."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    os.chmod(tmp_path, 0o755)
    return d


@pytest.mark.privileged
def test_report_replaces_a_planted_symlink_and_never_writes_through_it(tmp_path):
    shared = _sticky_dir(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("root's own\n")
    os.chmod(secret, 0o600)
    link = shared / "report.json"
    os.symlink(secret, link)
    os.lchown(link, NOBODY, NOBODY)  # planted by another user
    r = subprocess.run([EXE, "--duration", "1", "--poll-interval", "0", "--report", str(link)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert secret.read_text() == "root's own\n"  # the link's target is untouched
    st = os.lstat(link)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    report = json.loads(link.read_text())
    assert report["events_lost"] == 0 and "duration_s" in report
    assert sorted(os.listdir(shared)) == ["report.json"]  # no temporary file left beside it
    # run again: our own earlier report is replaced the same way
    r = subprocess.run([EXE, "--duration", "1", "--poll-interval", "0", "--report", str(link)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(link.read_text()) != report and stat.S_IMODE(os.lstat(link).st_mode) == 0o600
    assert sorted(os.listdir(shared)) == ["report.json"]


@pytest.mark.privileged
def test_a_refused_start_leaves_no_report_file(tmp_path):
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop privileges for this test"
    d = tempfile.mkdtemp(prefix="tcplife-report-")  # a directory the unprivileged user can reach
    os.chmod(d, 0o777)
    report = os.path.join(d, "report.json")
    r = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                        "--bounding-set=-all", EXE, "--duration", "1", "--report", str(report)],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 2 and "tracing needs root" in r.stderr, r.stderr
        assert os.listdir(d) == []  # nothing: no empty report, no temporary file
    finally:
        shutil.rmtree(d)


def test_a_report_into_a_missing_directory_is_refused_before_tracing(tmp_path):
    r = subprocess.run([EXE, "--duration", "1", "--report", str(tmp_path / "no" / "r.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcplife-trace: error: cannot write report "), r.stderr
    assert not (tmp_path / "no").exists()
