"""Fuzz of the command line over flags and files: every case ends with the documented exit
status, one line on stderr when it is an error, no traceback, no hang.

Cases run in one worker process (tests/cli_fuzz_worker.py), unprivileged: a command line the
parser accepts then stops at the privilege check (one line, exit 2) without loading BPF, and
one it should refuse must be refused before that, by a message about what is wrong. Files for
`analyze` are mangled recordings, wrong headers, bad tcpstates text, directories it cannot
read, exports it cannot write.
"""
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcplife_trace import recording

from synthetic import stream
from test_recording import ROWS, write

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534
ROOT_LINE = "tcplife-trace: error: tracing needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"
EXAMPLES = int(os.environ.get("TCPLIFE_TRACE_CLI_FUZZ_EXAMPLES", 120))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Worker:
    def __init__(self):
        cmd = [sys.executable, os.path.join(HERE, "cli_fuzz_worker.py")]
        if os.geteuid() == 0:  # drop root: what the parser accepts must then stop at the privilege check
            cmd = [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        assert self._line(60) == "ready"

    def _line(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the worker did not answer (a case hung past its own alarm)"
        return self.proc.stdout.readline().strip()

    def run(self, argv):
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(30))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def worker():
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run the fuzz cases unprivileged")
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def place():
    """A directory the unprivileged worker can write into, and the files analyze is given."""
    d = tempfile.mkdtemp(prefix="tcplife-fuzz-")
    os.chmod(d, 0o777)
    files = _files(d)
    yield d, files
    for root, dirs, _ in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
    shutil.rmtree(d)


def _recording(path, with_snapshot=True):
    from test_recorded_snapshots import SEED
    w = write(path, stream(ROWS[:5]), close=False)
    if with_snapshot:
        w.add_snapshot(5_000_000, True, SEED, {"mibs": {4026531833: {"ListenOverflows": 1}}})
    w.add(stream(ROWS[5:]))
    w.close()


def _with_header(path, head_json):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    sch = pa.schema([pa.field(n, t) for n, t in recording._ARROW_TYPES.items()],
                    metadata={recording.KEY: head_json.encode()})
    with open(path, "wb") as f:
        w = ipc.new_stream(f, sch)
        w.write_batch(recording._batch(sch, recording._packed(stream(ROWS))))
        w.close()


def _files(d):
    """name -> path of what analyze is fed (readable by the worker unless meant not to be)."""
    f = {}
    ok = f["ok"] = os.path.join(d, "ok.arrow")
    _recording(ok)
    raw = open(ok, "rb").read()
    for name, data in [("empty", b""), ("garbage", b"\xff\xff\xff\xff\x10\x00\x00\x00garbage"),
                       ("csv", b"ts,pid\n1,2\n"), ("cut", raw[:len(raw) // 2]), ("cut_end", raw[:-7])]:
        f[name] = os.path.join(d, f"{name}.arrow")
        open(f[name], "wb").write(data)
    snap = raw.find(b"\x28\xb5\x2f\xfd")  # the snapshot's zstd frame: one flipped byte inside it
    for k, off in enumerate((40, 200, 333, 500)):
        b = bytearray(raw)
        b[min(len(b) - 1, snap + off)] ^= 0x5A
        f[f"snapflip{k}"] = os.path.join(d, f"snapflip{k}.arrow")
        open(f[f"snapflip{k}"], "wb").write(bytes(b))
    head = recording.header("none", 0)
    for name, h in [("hlist", [1, 2]), ("mono_str", {**head, "mono_to_wall_ns": "soon"}),
                    ("mono_nan", {**head, "mono_to_wall_ns": float("nan")}),
                    ("mono_huge", {**head, "mono_to_wall_ns": 10 ** 30}), ("host_list", {**head, "host": [1]}),
                    ("ver_str", {**head, "schema_version": "x"}), ("newer", {**head, "schema_version": 99})]:
        f[name] = os.path.join(d, f"{name}.arrow")
        _with_header(f[name], json.dumps(h))
    good_text = open(os.path.join(HERE, "data", "tcpstates-bpfcc-T-w.txt")).read().splitlines()
    for name, (col, value) in {"ts_skaddr": (1, "ffffzz"), "ts_addr": (5, "127.0.0.300"), "ts_port": (6, "70000"),
                               "ts_ms": (-1, "nan")}.items():
        lines = list(good_text)
        tok = lines[1].split()
        tok[col] = value
        lines[1] = " ".join(tok)
        f[name] = os.path.join(d, f"{name}.txt")
        open(f[name], "w").write("\n".join(lines) + "\n")
    f["dir_ok"] = os.path.join(d, "dir_ok")
    os.mkdir(f["dir_ok"])
    shutil.copy(ok, f["dir_ok"])
    f["dir_empty"] = os.path.join(d, "dir_empty")
    os.mkdir(f["dir_empty"])
    f["dir_locked"] = os.path.join(d, "dir_locked")
    os.mkdir(f["dir_locked"])
    shutil.copy(ok, f["dir_locked"])
    f["file_locked"] = os.path.join(d, "locked.arrow")
    shutil.copy(ok, f["file_locked"])
    f["missing"] = os.path.join(d, "missing.arrow")
    f["glob_none"] = os.path.join(d, "*.nomatch")
    f["glob_ok"] = os.path.join(d, "dir_ok", "*.arrow")
    for p in f.values():
        if os.path.isfile(p):
            os.chmod(p, 0o644)
    if os.geteuid() == 0:  # (the worker is uid 65534: these it may not read)
        os.chmod(f["dir_locked"], 0o700)
        os.chmod(f["file_locked"], 0o600)
    ro = os.path.join(d, "readonly")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    f["readonly_dir"] = ro
    return f


# -- what a case is: argv and whether a value in it is bad by construction ----------------

def opt(flag, good, bad=()):
    """(flag, value, bad?) drawn from the good or the bad values."""
    choices = [st.tuples(st.just(flag), st.sampled_from(good), st.just(False))]
    if bad:
        choices.append(st.tuples(st.just(flag), st.sampled_from(bad), st.just(True)))
    return st.one_of(*choices)


PIDS = opt("-p", ["1", "42,4242", str(2 ** 22)], ["abc", "0", "-1", "99999999", "1,,2", "1;2"])
LPORT = opt("-L", ["80", "80,443", "65535"], ["0", "65536", "x", "1e3", "80 443"])
RPORT = opt("-D", ["53", "1,2,3"], ["0", "99999", "-5"])
SECONDS_BAD = ["-1", "inf", "nan", "-inf", "1e400", "x", ""]
THRESH = opt("--threshold", ["close_wait_age_s=3", "pile_warning=5", "time_wait_use=0.9"],
             ["nope=1", "close_wait_age_s=nan", "close_wait_age_s=inf", "close_wait_age_s=-1",
              "pile_warning=1.5", "close_wait_age_s", "=3"])
COMMON = [PIDS, LPORT, RPORT, THRESH,
          opt("--poll-interval", ["0", "5", "0.5"], ["-1", "nan", "inf", "x"]),
          opt("--nice", ["0", "19", "-20"], ["20", "-21", "x"]),
          opt("--max-conns", ["1024", "65536"], ["10", "5000000", "x"]),
          opt("--ring-pages", ["1", "64", "4096"], ["3", "0", "2000000", "x", "6"])]
LIVE = COMMON + [
    opt("--duration", ["0.5", "3", "1e3"], ["0"] + SECONDS_BAD),
    opt("--metrics-port", ["9470", "65535"], ["0", "70000", "x"]),
    opt("--metrics-label-cap", ["10"], ["0", "x"]),
    opt("--kernel-mode", ["auto", "stream"], ["fast", ""]),
]
SERVE = COMMON + [opt("--duration", ["0.5", "3"], ["0"] + SECONDS_BAD),
                  opt("--metrics-port", ["9470"], ["0", "70000"]),
                  opt("--metrics-labels", ["port", "comm", "port,comm"], ["bogus", "port,bogus"])]
DOCTOR = [PIDS, LPORT, RPORT, THRESH, opt("--duration", ["0", "1", "2.5"], SECONDS_BAD),
          opt("--interval", ["0", "1"], SECONDS_BAD), opt("--fail-on", ["info", "warning", "critical"], ["bogus"])]
FLAGS_LIVE = ["-T", "-t", "-w", "-4", "-6", "--lifecycles", "--json", "--strict"]


@st.composite
def command(draw, options, flags, paths=None):
    chosen = draw(st.lists(st.sampled_from(range(len(options))), max_size=5, unique=True))
    argv, bad = [], False
    for i in chosen:
        flag, value, is_bad = draw(options[i])
        argv += [flag, value]
        bad |= is_bad
    argv += draw(st.lists(st.sampled_from(flags), max_size=3, unique=True)) if flags else []
    if paths is not None and draw(st.booleans()):
        flag, path, is_bad = draw(paths)
        argv += [flag, path]
        bad |= is_bad
    if draw(st.integers(0, 9)) == 0:  # now and then a token that is no option at all
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-Z", "extra"])))
        bad = True
    return argv, bad


def _check_error(res, argv, bad):
    """Exit 2, one line, no traceback, no hang; a bad value is named before any privilege check."""
    where = f"argv {argv}: {res}"
    assert not res["hung"], where
    assert res["traceback"] is None, where
    assert res["rc"] == 2, where
    lines = res["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcplife-trace: error: "), where
    if bad:
        assert lines[0] != ROOT_LINE, f"a bad value got as far as the privilege check: {where}"


def _paths(d, record=True):
    """--record / --report paths: fresh ones in a writable place, and ones that cannot be."""
    fresh = [os.path.join(d, f"case-{n}.arrow") for n in range(3)]
    choices = [st.tuples(st.just("--report"), st.sampled_from(fresh), st.just(False)),
               st.tuples(st.just("--report"), st.sampled_from(["/nonexistent/dir/r.json", d]), st.just(True))]
    if record:
        choices += [st.tuples(st.just("--record"), st.sampled_from(fresh), st.just(False)),
                    st.tuples(st.just("--record"), st.sampled_from(["/nonexistent/dir/r.arrow",
                                                                    os.path.join(d, "ok.arrow")]), st.just(True))]
    return st.one_of(*choices)


@FUZZ
@given(data=st.data())
def test_live_command_line(worker, place, data):
    d, _ = place
    argv, bad = data.draw(command(LIVE, FLAGS_LIVE, _paths(d)))
    res = worker.run(argv)
    _check_error(res, argv, bad)
    for n in range(3):  # a refused start leaves no recording and no report behind
        assert not os.path.exists(os.path.join(d, f"case-{n}.arrow")), argv


@FUZZ
@given(data=st.data())
def test_serve_command_line(worker, place, data):
    d, _ = place
    argv, bad = data.draw(command(SERVE, ["-4", "-6", "--strict"], _paths(d)))
    _check_error(worker.run(["serve", *argv]), argv, bad)
    for n in range(3):
        assert not os.path.exists(os.path.join(d, f"case-{n}.arrow")), argv


@FUZZ
@given(data=st.data())
def test_doctor_command_line(worker, data):
    argv, bad = data.draw(command(DOCTOR, ["--json", "-4", "-6"]))
    res = worker.run(["doctor", *argv])
    if not bad and res["rc"] in (0, 1) and ("--duration", "0") in zip(argv, argv[1:]):
        # one snapshot judged at once needs no BPF: it runs unprivileged (0 healthy, 1 findings)
        assert res["traceback"] is None and not res["hung"], res
        return
    _check_error(res, argv, bad)


ANALYZE_OPTS = [LPORT, PIDS, THRESH,
                opt("--format", ["table", "json", "csv"], ["xml", ""]),
                opt("--since", ["2026-11-22T19:00:00Z", "2020-01-01"], ["yesterday", "2026-13-45", "nan"]),
                opt("--until", ["2030-01-01T00:00:00+01:00"], ["soon"]),
                opt("--workers", ["1", "4"], ["0", "x"]),
                opt("--date", ["2026-11-22"], ["2026-02-30", "22/11/2026"]),
                opt("--tz", ["UTC", "Europe/Paris"], ["Mars/Olympus", "../../etc/passwd"])]


@FUZZ
@given(data=st.data())
def test_analyze_files_and_options(worker, place, data):
    d, files = place
    names = data.draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=3))
    argv, bad = data.draw(command(ANALYZE_OPTS, []))
    if data.draw(st.booleans()):
        export, export_bad = data.draw(st.sampled_from([
            (os.path.join(d, "exports", str(data.draw(st.integers(0, 3)))), False), ("/proc/x", True),
            (os.path.join(files["readonly_dir"], "x"), os.geteuid() == 0), (files["ok"], True)]))
        argv += ["--export", export]
        bad |= export_bad
    if data.draw(st.integers(0, 4)) == 0:  # a mangled recording of the case's own
        raw = bytearray(open(files["ok"], "rb").read())
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = raw[:data.draw(st.integers(0, len(raw)))]
        mangled = os.path.join(d, "mangled.arrow")
        with open(mangled, "wb") as f:
            f.write(bytes(raw))
        os.chmod(mangled, 0o644)
        names = names + ["__mangled__"]
    paths = [os.path.join(d, "mangled.arrow") if n == "__mangled__" else files[n] for n in names]
    res = worker.run(["analyze", *paths, *argv])
    where = f"analyze {paths} {argv}: {res}"
    assert not res["hung"] and res["traceback"] is None, where
    lines = res["stderr"].splitlines()
    if res["rc"] == 0:
        assert not bad, f"a bad value was accepted: {where}"
        assert all(ln.startswith(("tcplife-trace: warning: ", "tcplife-trace: wrote ", "tcplife-trace: notice: "))
                   for ln in lines), where
    else:
        assert res["rc"] == 2, where
        assert len(lines) == 1 and lines[0].startswith("tcplife-trace: error: "), where


def test_the_worker_reports_a_traceback_and_a_bad_value(worker):
    """The harness itself: a case that gets past the parser reaches the privilege check (so the
    oracle's 'bad value named first' means something), and an exit status is read back."""
    res = worker.run(["--duration", "1"])
    if os.geteuid() == 0:
        assert res["stderr"].strip() == ROOT_LINE and res["rc"] == 2
    res = worker.run(["--duration", "nan"])
    assert res["rc"] == 2 and "--duration" in res["stderr"] and "not a number of seconds" in res["stderr"]
    res = worker.run(["doctor", "--duration", "nan"])
    assert res["rc"] == 2 and "--duration" in res["stderr"]
