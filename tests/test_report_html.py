"""`analyze --html` / `--plots`: the report page opened in a real headless Chromium (Debian's),
driven over the DevTools protocol on a pipe; the numbers in the page against the frames."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from tcplife_trace import analysis_report, load, recording, report_html, report_plots
from tcplife_trace.cli import main
from tcplife_trace.probes.filters import Filters
from tcplife_trace.recording import RecordingWriter

from synthetic import stream
from test_offline_equivalence import ROWS

EXE = os.path.join(os.path.dirname(sys.executable), "tcplife-trace")
PLOTS = {"open_by_state", "new_and_ended", "time_in_state", "by_peer", "by_local_port", "by_process", "timeline"}
UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}


class Chromium:
    """Headless Chromium speaking the DevTools protocol over --remote-debugging-pipe: commands
    on its fd 3, answers and events on its fd 4, each message a JSON text ended by NUL."""

    def __init__(self):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("Chromium is needed for the HTML report tests: scripts/provision.sh --test-tools "
                        "installs Debian's chromium")
        self.profile = tempfile.mkdtemp(prefix="tlt-chromium-")
        theirs_in, self._out = os.pipe()
        self._in, theirs_out = os.pipe()

        def fds():
            os.dup2(theirs_in, 3)
            os.dup2(theirs_out, 4)
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(theirs_in)
        os.close(theirs_out)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method, params=None, session=None, timeout=60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                assert "error" not in m, f"{method}: {m['error']}"
                return m["result"]
            self.events.append(m)

    def _next(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer in time"
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                assert chunk, "Chromium closed the DevTools pipe"
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def wait_event(self, method, session, timeout=60):
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method and m.get("sessionId") == session:
                return m
        while True:
            m = self._next(deadline)
            self.events.append(m)
            if m.get("method") == method and m.get("sessionId") == session:
                return m

    def open(self, path) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
        self.wait_event("Page.loadEventFired", session)
        return Page(self, session)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser, session):
        self.b, self.session = browser, session

    def js(self, expression):
        r = self.b.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session=self.session)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def _mine(self, method):
        return [m["params"] for m in self.b.events if m.get("method") == method and m.get("sessionId") == self.session]

    def errors(self) -> list:
        """Script exceptions, console errors and warnings, and the browser's own error log."""
        self.js("1")  # (events emitted up to now have arrived)
        return (self._mine("Runtime.exceptionThrown")
                + [c for c in self._mine("Runtime.consoleAPICalled") if c["type"] in ("error", "warning", "assert")]
                + [e for e in self._mine("Log.entryAdded") if e["entry"]["level"] in ("error", "warning")])

    def requests(self) -> list[str]:
        return [r["request"]["url"] for r in self._mine("Network.requestWillBeSent")]


@pytest.fixture(scope="module")
def chromium():
    b = Chromium()
    yield b
    b.close()


# --- what the page shows ---------------------------------------------------------------

PAGE_FACTS = """(() => {
  const num = el => el === null ? null : el.getAttribute('data-v');
  return Array.from(document.querySelectorAll('section.host')).map(s => ({
    id: s.id, host: s.getAttribute('data-host'), hidden: s.hidden,
    cards: Object.fromEntries(Array.from(s.querySelectorAll('[data-k]')).map(e => [e.getAttribute('data-k'), num(e)])),
    ends: Array.from(s.querySelectorAll('#end-reasons tbody tr')).map(tr => [tr.getAttribute('data-reason'), tr.cells[1].getAttribute('data-v'), tr.cells[1].textContent]),
    states: Array.from(s.querySelectorAll('#time-in-state tbody tr')).map(tr => Array.from(tr.cells).map(td => [td.getAttribute('data-v'), td.textContent])),
    findings: Array.from(s.querySelectorAll('#findings tbody tr')).map(tr => tr.getAttribute('data-kind')),
    plots: Array.from(s.querySelectorAll('figure.plot')).map(f => {
      const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
      return {name: f.getAttribute('data-plot'), width: r.width, height: r.height,
              drawn: svg ? svg.querySelectorAll('path, rect, image, use, text').length : 0,
              bbox: svg ? svg.getBBox().width * svg.getBBox().height : 0};
    }),
    text: s.innerText,
  }));
})()"""


def shown_seconds(text: str) -> float:
    m = re.fullmatch(r"(-?[\d.,]+) (s|ms|µs|ns)", text.strip())
    assert m, text
    return float(m.group(1).replace(",", "")) * UNITS[m.group(2)]


def check_section(facts: dict, frames: dict) -> None:
    """The numbers of a host's section are the frames' numbers."""
    lc, tr = frames["lifecycles"], frames["transitions"]
    cards = facts["cards"]
    assert int(cards["connections"]) == len(lc)
    assert int(cards["transitions"]) == len(tr)
    assert int(cards["still_open"]) == int((lc.end_reason == "open").sum())
    assert int(cards["findings"]) == len(frames["leaks"])
    counts = lc.end_reason.value_counts()
    assert {r: int(v) for r, v, _ in facts["ends"]} == {str(r): int(n) for r, n in counts.items() if n}
    assert all(int(v) == int(t.replace(",", "")) for _, v, t in facts["ends"])
    summ = frames["summary"].set_index("state")
    assert [row[0][1] for row in facts["states"]] == [str(s) for s in summ.index]
    for row in facts["states"]:
        state = row[0][1]
        assert int(row[1][0]) == int(summ.loc[state, "count"])
        for (exact, text), col in zip(row[2:], ("p50_s", "p90_s", "p99_s", "max_s"), strict=True):
            want = float(summ.loc[state, col])
            assert float(exact) == want, (state, col)
            assert shown_seconds(text) == pytest.approx(want, rel=1e-3, abs=1e-9), (state, col, text)
    assert facts["findings"] == list(frames["leaks"]["kind"])


def check_rendered(page: Page, facts: list[dict], plots=PLOTS) -> None:
    assert page.errors() == []
    # nothing but the file itself and the plots' inline images (data:) was loaded
    assert [u for u in page.requests() if not u.startswith(("file://", "data:"))] == []
    for s in facts:
        if s["hidden"]:
            continue
        assert {p["name"] for p in s["plots"]} == plots
        for p in s["plots"]:
            assert p["width"] > 400 and p["height"] > 100 and p["drawn"] > 20 and p["bbox"] > 0, p


def open_report(chromium, path) -> tuple[Page, list[dict]]:
    page = chromium.open(path)
    return page, page.js(PAGE_FACTS)


# --- a real recording -------------------------------------------------------------------

def _serve(listener, held, stop):
    """Accept; read each connection to EOF and close it (the peer closed first), except the
    first `held` ones, kept open (still open when the trace ends)."""
    keep = []
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            c, _ = listener.accept()
        except TimeoutError:
            continue
        if len(keep) < held:
            keep.append(c)
            continue
        while c.recv(4096):
            pass
        c.close()
    for c in keep:
        c.close()


def loopback_workload():
    """Known connections on loopback, from this process: 6 IPv4 and 2 IPv6 closed by the
    client first, 3 refused, 1 IPv4 held open past the end of the trace."""
    servers, threads, stop = [], [], threading.Event()
    for family, addr, held in ((socket.AF_INET, "127.0.0.1", 1), (socket.AF_INET6, "::1", 0)):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((addr, 0))
        s.listen(16)
        servers.append(s)
        t = threading.Thread(target=_serve, args=(s, held, stop), daemon=True)
        t.start()
        threads.append(t)
    closed = socket.socket()  # bound, never listening: connects to it are refused (RST)
    closed.bind(("127.0.0.1", 0))
    held = socket.create_connection(servers[0].getsockname()[:2], timeout=5)
    for family, s, n in ((socket.AF_INET, servers[0], 6), (socket.AF_INET6, servers[1], 2)):
        for _ in range(n):
            c = socket.create_connection(s.getsockname()[:2], timeout=5)
            c.sendall(b"x" * 100)
            time.sleep(0.02)
            c.close()
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(closed.getsockname(), timeout=5)
    time.sleep(0.3)

    def finish():
        held.close()
        stop.set()
        for t in threads:
            t.join(timeout=5)
        for s in (*servers, closed):
            s.close()
    return {"v4": servers[0].getsockname()[1], "v6": servers[1].getsockname()[1],
            "refused": closed.getsockname()[1], "held": held.getsockname()[1], "finish": finish}


@pytest.fixture(scope="module")
def real_recording(tmp_path_factory):
    from conftest import _why_not_privileged, REQUIRE
    why = _why_not_privileged()
    if why:
        (pytest.fail if REQUIRE else pytest.skip)(f"privileged test: {why}")
    path = tmp_path_factory.mktemp("real") / "incident.arrow"
    proc = subprocess.Popen([EXE, "--record", str(path), "--duration", "4", "--poll-interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    early = []
    while True:
        line = proc.stderr.readline()
        early.append(line)
        if not line or "tracing TCP state changes" in line:
            break
    ports = loopback_workload()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        ports["finish"]()
    assert proc.returncode == 0, "".join(early) + err
    return str(path), ports


def _ours(lc, ports):
    return {
        "v4": lc[(lc.rport == ports["v4"]) & (lc.role == "active") & (lc.lport != ports["held"])],
        "v6": lc[(lc.rport == ports["v6"]) & (lc.role == "active")],
        "refused": lc[lc.rport == ports["refused"]],
        "held": lc[(lc.lport == ports["held"]) | (lc.rport == ports["held"])],
    }


@pytest.mark.privileged
def test_report_of_a_real_recording_in_chromium(real_recording, chromium, tmp_path):
    path, ports = real_recording
    out, plots = tmp_path / "report.html", tmp_path / "plots"
    assert main(["analyze", path, "--html", str(out), "--plots", str(plots)]) == 0
    assert os.stat(out).st_mode & 0o777 == 0o600
    frames = analysis_report.frames(load(path), Filters())
    ours = _ours(frames["lifecycles"], ports)
    # the workload's connections are in the frames as they happened
    assert len(ours["v4"]) == 6 and set(ours["v4"].end_reason) == {"active_close"}
    assert len(ours["v6"]) == 2 and set(ours["v6"].family) == {6}
    assert len(ours["refused"]) == 3 and set(ours["refused"].end_reason) == {"refused"}
    assert len(ours["held"]) == 2 and set(ours["held"].end_reason) == {"open"}
    assert (ours["v4"].pid == os.getpid()).all()
    page, facts = open_report(chromium, out)
    assert len(facts) == 1 and facts[0]["host"] == socket.gethostname()
    check_rendered(page, facts)
    check_section(facts[0], frames)
    text = facts[0]["text"]
    assert f"{ports['refused']}" in text  # the refused connects' peer port is in the tables
    assert "socket snapshots" in text and "events_lost" in text
    # the plots as files: the same names, real PNG and SVG
    names = sorted(os.listdir(plots))
    assert names == sorted(f"{n}.{ext}" for n in PLOTS for ext in ("png", "svg"))
    for n in PLOTS:
        with open(plots / f"{n}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        root = ET.parse(plots / f"{n}.svg").getroot()
        assert root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 10


@pytest.mark.privileged
def test_tables_sort_on_click(real_recording, chromium, tmp_path):
    path, _ = real_recording
    out = tmp_path / "report.html"
    assert main(["analyze", path, "--html", str(out)]) == 0
    page = chromium.open(out)
    col = """(() => Array.from(document.querySelectorAll('#time-in-state tbody tr'))
               .map(tr => parseFloat(tr.cells[2].getAttribute('data-v'))))()"""
    before = page.js(col)
    page.js("document.querySelectorAll('#time-in-state th')[2].click()")
    desc = page.js(col)
    page.js("document.querySelectorAll('#time-in-state th')[2].click()")
    asc = page.js(col)
    assert sorted(before) == desc[::-1] == asc and len(asc) >= 3
    assert page.errors() == []


def test_open_connections_over_time_add_up_to_the_time_in_each_state():
    """The stacked plot's area in each state is the time connections spent there, counted by
    hand from the synthetic stream: the connection born before the recording counts from the
    start, the one still open to the end, and a child born from LISTEN takes nothing from it."""
    rec = recording.Recording.from_events(stream(ROWS), recording.header("none", 0), {"events_lost": 0})
    a = report_plots.aggregates(analysis_report.frames(rec, Filters()))
    area = {s: float((v * a.widths_s).sum()) for s, v in a.open_by_state.items()}
    # (10 was open before the recording too; 9, seen only reading and writing, is in no state)
    ms = {"ESTABLISHED": (9 - 5.1) + (11 - 1) + (4000.01 - 31) + (55 - 51) + 60 + (4000.01 - 71) + 67,
          "LISTEN": 80, "SYN_SENT": 1 + 0.6 + 1 + 1 + 1, "SYN_RECV": 0.1, "CLOSE_WAIT": 1 + 1, "LAST_ACK": 0.1 + 0.5,
          "FIN_WAIT1": 0.5 + 1, "FIN_WAIT2": 1.5 + 1}
    assert area == pytest.approx({s: v / 1e3 for s, v in ms.items()}, rel=1e-9, abs=1e-12)
    assert a.bin_s == 0.01
    # first bin (0-10 ms): the two born before all of it, 1-10 ms one, 5.1-9 ms another
    assert a.open_by_state["ESTABLISHED"][0] == pytest.approx((10 + 10 + 9 + 3.9) / 10)
    assert a.open_by_state["ESTABLISHED"][-1] == pytest.approx(2.0)  # the last 10 us: 2 open to the end
    # the timeline: the longest (born in the recording, ended), then the one still open, state by state
    assert list(a.longest.conn_id) == [5, 1, 3, 2, 6, 4] and list(a.still_open.conn_id) == [9, 8]
    assert 9 not in a.segments  # open before the recording, only read and written: no state to draw
    assert a.segments[8] == [(0.07, 0.071, "SYN_SENT", False), (0.071, 4.00001, "ESTABLISHED", False)]


def _synthetic(path, host, rows=ROWS):
    w = RecordingWriter(str(path), recording.header("none", 1_800_000_000_000_000_000, {"host": host}))
    w.add(stream(rows))
    w.close({"events_lost": 0})
    return str(path)


def test_recordings_of_two_hosts_one_section_each(chromium, tmp_path):
    a = _synthetic(tmp_path / "a.arrow", "alpha")
    b = _synthetic(tmp_path / "b.arrow", "beta", [r for r in ROWS if r[2] in (1, 2, 3, 4)])
    out = tmp_path / "fleet.html"
    assert main(["analyze", a, b, "--html", str(out)]) == 0
    page, facts = open_report(chromium, out)
    assert [s["host"] for s in facts] == ["alpha", "beta"]
    check_rendered(page, facts)
    for s, p in zip(facts, (a, b), strict=True):
        check_section(s, analysis_report.frames(load(p), Filters()))
    # the host selector shows one host at a time
    page.js("const s = document.getElementById('host'); s.value = 'host-beta'; s.dispatchEvent(new Event('change'))")
    assert [s["hidden"] for s in page.js(PAGE_FACTS)] == [True, False]
    assert page.errors() == []


@pytest.mark.parametrize("capture", ["tcpstates-bpfcc-T-w.txt", "libbpf-tcpstates-T-w.txt"])
def test_report_of_a_tcpstates_capture(chromium, tmp_path, capture):
    src = os.path.join(os.path.dirname(__file__), "data", capture)
    out = tmp_path / "t.html"
    assert main(["analyze", src, "--html", str(out), "--date", "2026-11-22", "--tz", "UTC"]) == 0
    page, facts = open_report(chromium, out)
    check_rendered(page, facts)
    check_section(facts[0], analysis_report.frames(load(src, _text_import()), Filters()))
    assert "imported from tcpstates text" in facts[0]["text"]


def _text_import():
    from tcplife_trace.cli import _text_import as parse
    return parse("2026-11-22", "UTC", None)


def test_recording_without_connections_says_so(chromium, tmp_path, capsys):
    p = tmp_path / "empty.arrow"
    w = RecordingWriter(str(p), recording.header("none", 1_800_000_000_000_000_000))
    w.close({"events_lost": 0})
    out, plots = tmp_path / "empty.html", tmp_path / "plots"
    assert main(["analyze", str(p), "--html", str(out), "--plots", str(plots)]) == 0
    err = capsys.readouterr().err
    assert f"no connections to plot: nothing written to {plots}" in err and "Traceback" not in err
    assert not plots.exists() or os.listdir(plots) == []
    page, facts = open_report(chromium, out)
    check_rendered(page, facts, plots=set())
    assert facts[0]["plots"] == [] and "no-connections" in facts[0]["cards"]
    assert "No connections in this recording" in facts[0]["text"]
    # the same when the filters leave none
    rec_path = _synthetic(tmp_path / "r.arrow", "h")
    assert main(["analyze", rec_path, "--html", str(out), "-L", "1"]) == 0
    page, facts = open_report(chromium, out)
    assert page.errors() == [] and "within the filters and time window given" in facts[0]["text"]


def test_html_to_an_impossible_place_is_one_line(tmp_path, capsys):
    rec_path = _synthetic(tmp_path / "r.arrow", "h")
    assert main(["analyze", rec_path, "--html", str(tmp_path / "no" / "such" / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tcplife-trace: error: cannot write") and "--html" in err[0]


def test_library_render_needs_no_cli(tmp_path):
    rec = load(_synthetic(tmp_path / "r.arrow", "h"))
    page = report_html.render(rec)
    assert page.startswith("<!DOCTYPE html>") and "<script src" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to fetch
    written = report_html.plots(rec, str(tmp_path / "p"))
    assert sorted(os.path.basename(w) for w in written) == sorted(f"{n}.{e}" for n in PLOTS for e in ("png", "svg"))
    assert np.all([os.path.getsize(w) > 1000 for w in written])
