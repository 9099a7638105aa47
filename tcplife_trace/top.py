"""`tcplife-trace top`: a full-screen live view of the connections (rich), or a plain periodic
print when stdout is not a terminal.

Two threads: the consumer (TopRunner._consume) polls the LiveSession, feeds the TopModel, looks
at the sockets every few seconds and, once a second, publishes a TopSnapshot; the screen
(main thread) reads the latest snapshot, draws it and reads the keys. The screen never takes a
lock the consumer waits on: a slow terminal (SSH, a paused tmux) delays only the drawing.

    runner = TopRunner(settings, record_path=None)
    runner.start(); ...; snap = runner.latest; report = runner.stop()
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field

from .live import LiveSession
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from .stop_signals import StopRequest
from .top_model import ALL_GROUPS, GROUPS, SORTS, TopModel, TopSnapshot, home_name, parse_filter

MIN_W, MIN_H = 30, 6         # below this, one line saying the terminal is too small
STATE_TIMES_EVERY_S = 5.0    # percentiles are sorted again this often (they sort up to 200,000 samples)
SPARK = "▁▂▃▄▅▆▇█"
SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


# -- the consumer side ---------------------------------------------------------------------------
class TopRunner:
    """A LiveSession run by a thread of its own, feeding a TopModel; `latest` is the snapshot the
    screen draws (replaced whole, once a second)."""

    def __init__(self, settings: prog.Settings, *, record_path: str | None = None, record_host: str | None = None,
                 poll_interval: float = 2.0, refresh_s: float = 1.0, thresholds=None):
        self.model = TopModel(home_of=_home_resolver())
        self.refresh_s = refresh_s
        self.poll_interval = poll_interval
        self.thresholds = thresholds
        self.latest: TopSnapshot | None = None
        self.report: dict | None = None
        self.failed: BaseException | None = None
        self.watch = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        wall_offset = time.time_ns() - time.monotonic_ns()
        self.recorder = None
        if record_path:
            from . import recording
            self.recorder = recording.RecordingWriter(
                record_path, recording.header(settings.filters, wall_offset, host=record_host))
        try:
            self.session = LiveSession(settings, on_transition=self.model.transition, on_close=self.model.closed,
                                       on_loss=self._lost, recorder=self.recorder, wall_offset_ns=wall_offset)
        except BaseException:
            if self.recorder is not None:
                self.recorder.discard()
            raise
        self.notices = list(self.session.notices)
        self._last = (time.monotonic(), 0, sum(os.times()[:2]))
        self._recording_said = False

    def _lost(self, new: int, total: int, why: str) -> None:
        self.model.say(f"{new} events lost in the kernel ({total} so far): {why}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._consume, name="tcplife-top-consumer", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def stopped(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def stop(self) -> dict:
        """Stop the consumer; the session's report (with the findings of the run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.report is None:  # the consumer died before it could stop the session
            self.report = self.session.stop()
        if self.failed is not None:
            raise self.failed
        return self.report

    def _consume(self) -> None:
        s = self.session
        try:
            if self.poll_interval > 0:
                with s.pumping():  # the detectors' import and the first look: the recording goes on
                    from .diagnosis import Watch
                    from tcplife_trace.probes import sock_diag
                    self.watch = Watch(self.thresholds, tracker=s.tracker, filters=s.settings.filters,
                                       poll_states=sock_diag.POLL_STATES | (1 << sock_diag.S.ESTABLISHED),
                                       open_lifecycles=s.open_lifecycles)
                    s.close_watchers.append(self.watch.closed)
                    if self.recorder is not None:
                        self.watch.record_into(self.recorder)
                    self.watch.take_seed()
                self._looked()
            next_poll = time.monotonic() + self.poll_interval
            next_snap, next_times, times = 0.0, 0.0, []
            while not self._stop.is_set():
                s.poll(100)
                now = time.monotonic()
                if self.recorder is not None and self.recorder.failed and not self._recording_said:
                    self._recording_said = True
                    self.model.say(f"error: {self.recorder.failed}")
                if self.watch is not None and now >= next_poll:
                    with s.pumping():
                        self.watch.poll()
                    self._looked()
                    next_poll = time.monotonic() + self.poll_interval
                if now >= next_snap:
                    if now >= next_times:
                        times, next_times = s.state_times.table(), now + STATE_TIMES_EVERY_S
                    self.latest = self.model.snapshot(s.open_lifecycles(), self._status(), times)
                    next_snap = now + self.refresh_s
            s.poll(0)
            findings = None
            if self.watch is not None:
                with s.pumping():
                    findings = self.watch.final(full=False)
            report = s.stop()
            if findings is not None:
                report["findings"] = [f.as_dict() for f in self.watch.all_findings()]
                report["snapshot_errors"] = list(self.watch.errors)
            self.report = report
        except BaseException as e:  # noqa: BLE001 - raised again by stop(), in the caller's thread
            self.failed = e
            self._stop.set()

    def _looked(self) -> None:
        self.model.sockets_seen(self.watch.latest_counts)
        self.model.findings_seen(self.watch.current)  # (shown with their severity: not said again)
        for e in self.watch.new_errors():
            self.model.say(f"sockets not read: {e}")

    def _status(self) -> dict:
        """events/s, losses, connection map and ring buffer fill, the tracer's CPU (% of one CPU)."""
        s = self.session
        counts = s.counts_now()
        now, cpu = time.monotonic(), sum(os.times()[:2])
        t0, received0, cpu0 = self._last
        self._last = (now, counts["events_received"], cpu)
        dt = max(now - t0, 1e-6)
        out = {"events_per_s": (counts["events_received"] - received0) / dt,
               "lost": sum(counts["events_lost_by_kind"].values()), "map_full": counts["conn_map_full"],
               "evictions": counts["evictions"], "ring_fill": s.stream.ring_fill(),
               "ring_peak": s.stream.peak_fill, "cpu_pct": 100 * (cpu - cpu0) / dt,
               "map_fill": None, "recording": self.recorder.path if self.recorder is not None else None,
               "looks": self.poll_interval > 0}
        try:
            from tcplife_trace.probes.map_count import count_entries
            n = count_entries(s.program.bpf[b"conns"])
            if n is not None:
                out["map_fill"] = n / s.settings.max_conns
        except Exception:  # noqa: BLE001 - bcc raises Exception; an older kernel has no batch lookup
            pass
        return out


def _home_resolver():
    """pid -> the name of its cgroup (containers.Resolver), remembered per pid; None if the
    cgroup2 tree cannot be read here."""
    try:
        from .containers import Resolver
        resolver = Resolver()
    except Exception:  # noqa: BLE001 - no cgroup2 here: the container table says "-"
        return None
    seen: dict[int, str] = {}

    def home_of(pid: int) -> str:
        name = seen.get(pid)
        if name is None:
            try:
                name = home_name(resolver.by_pid(pid))
            except OSError:
                name = "(unknown)"
            if len(seen) > 50_000:
                seen.clear()
            seen[pid] = name
        return name
    return home_of


# -- what the screen shows -----------------------------------------------------------------------
@dataclass
class ViewState:
    """What the keys change."""
    sort: str = "churn"
    group: str = "all"                  # "all" or one of GROUPS
    view_filter: Filters | None = None  # the filter box's
    filter_text: str = ""
    editing: str | None = None          # the filter box while typing
    paused: TopSnapshot | None = None   # the snapshot frozen by pause
    error: str = ""                     # the filter box's last refusal
    help: bool = False
    extra: dict = field(default_factory=dict)

    def key(self, ch: str) -> bool:
        """One key (or one typed character); False: quit."""
        if self.editing is not None:
            if ch in ("\r", "\n"):
                try:
                    f = parse_filter(self.editing)
                except ValueError as e:
                    self.error = str(e)
                else:
                    self.view_filter = f if f.active() else None
                    self.filter_text, self.error = self.editing.strip(), ""
                self.editing = None
            elif ch == "\x1b":
                self.editing = None
            elif ch in ("\x7f", "\b"):
                self.editing = self.editing[:-1]
            elif ch.isprintable():
                self.editing += ch
            return True
        if ch in ("q", "Q"):
            return False
        if ch in ("/", "f"):
            self.editing, self.error = self.filter_text, ""
        elif ch == "c":
            self.view_filter, self.filter_text, self.error = None, "", ""
        elif ch == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif ch == "S":
            self.sort = SORTS[(SORTS.index(self.sort) - 1) % len(SORTS)]
        elif ch == "g":
            order = ("all",) + ALL_GROUPS
            self.group = order[(order.index(self.group) + 1) % len(order)]
        elif ch in ("h", "?"):
            self.help = not self.help
        return True

    def toggle_pause(self, latest: TopSnapshot | None) -> None:
        self.paused = None if self.paused is not None else latest


def spark(values: list[float], width: int) -> str:
    values = values[-width:]
    if not values:
        return ""
    hi = max(values)
    if hi <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / hi * (len(SPARK) - 1) + 0.5))] for v in values)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def status_line(snap: TopSnapshot) -> str:
    st = snap.status
    return (f"events/s {st.get('events_per_s', 0):.0f}  lost {st.get('lost', 0)}  map {_pct(st.get('map_fill'))}"
            f"  ring {_pct(st.get('ring_fill'))} (peak {_pct(st.get('ring_peak'))})  cpu {st.get('cpu_pct', 0):.0f}%"
            + (f"  map full {st['map_full']}" if st.get("map_full") else "")
            + (f"  evicted {st['evictions']}" if st.get("evictions") else ""))


def totals_line(snap: TopSnapshot, view: Filters | None) -> str:
    t = snap.filtered_totals(view)
    return (f"new {t['new']}  closed {t['closed']}  open {t['open']}  resets {t['resets']}  "
            f"refused {t['refused']}  timeouts {t['timeouts']}")


def rates_line(snap: TopSnapshot) -> str:
    ended = sum(snap.closed_per_s.values())
    by = " ".join(f"{r} {_rate(v)}" for r, v in snap.closed_per_s.items())
    return f"new/s {_rate(snap.new_per_s)}  closed/s {_rate(ended)}" + (f" ({by})" if by else "")


def sockets_parts(snap: TopSnapshot, trend_w: int = 8) -> list[str]:
    order = sorted(snap.sockets.items(), key=lambda kv: -kv[1])
    return [f"{state} {n}" + (f" {spark(snap.sockets_trend.get(state, []), trend_w)}" if trend_w else "")
            for state, n in order]


HEAD = ("NEW", "CLOSED", "OPEN", "RST", "REFUSED", "TIMEOUT", "CHURN/s")


def table_lines(snap: TopSnapshot, group: str, vs: ViewState, width: int, rows: int) -> list[str]:
    title = {"peer": "PEER", "port": "LOCAL PORT", "process": "PROCESS", "container": "CGROUP"}[group]
    num_w = 7 * 7 + 8  # seven columns
    name_w = max(8, width - num_w)
    cols = HEAD if width >= name_w + num_w else HEAD[:3] + HEAD[-1:]
    fmt_row = (lambda name, vals: f"{name[:name_w]:<{name_w}}" + "".join(f"{v:>8}" for v in vals))  # noqa: E731
    out = [fmt_row(f"{title} (by {vs.sort})", cols)]
    for r in snap.rows(group, vs.view_filter, vs.sort, limit=rows):
        vals = {"NEW": r.new, "CLOSED": r.closed, "OPEN": r.open, "RST": r.resets, "REFUSED": r.refused,
                "TIMEOUT": r.timeouts, "CHURN/s": _rate(r.churn)}
        out.append(fmt_row(r.name, [vals[c] for c in cols]))
    return out


def time_lines(snap: TopSnapshot, rows: int) -> list[str]:
    if not snap.state_times or rows < 2:
        return []
    out = ["%-12s %8s %9s %9s %9s %9s" % ("TIME IN", "COUNT", "p50 ms", "p90 ms", "p99 ms", "max ms")]
    for r in snap.state_times[:rows - 1]:
        out.append("%-12s %8d %9.3f %9.3f %9.3f %9.3f" % (r["state"], r["count"], r["p50_ms"], r["p90_ms"],
                                                       r["p99_ms"], r["max_ms"]))
    return out


def screen_lines(snap: TopSnapshot | None, vs: ViewState, width: int, height: int) -> list[tuple[str, str]]:
    """(text, style) per line, fitted to width x height (the most important first)."""
    if width < MIN_W or height < MIN_H:
        import textwrap
        msg = f"too small: {width}x{height}; top needs at least {MIN_W}x{MIN_H} (q quits)"
        return [(t[:width], "bold") for t in textwrap.wrap(msg, max(1, width))[:max(1, height)]]
    clock = time.strftime("%H:%M:%S")
    head = (f"tcplife-trace top  {clock}" + (f"  up {snap.elapsed_s:.0f}s" if snap else "")
            + f"  sort {vs.sort}" + (f"  filter {vs.filter_text}" if vs.filter_text else "")
            + ("  [PAUSED]" if vs.paused is not None else ""))
    if vs.editing is not None:
        foot = ("filter (-p PID -L PORT -D PORT -4 -6; Enter applies, Esc cancels): " + vs.editing + "_", "bold")
    elif vs.error:
        foot = (f"filter refused: {vs.error}", "bold red")
    elif vs.help:
        foot = ("q quit  p/space pause  s/S sort  g group  / filter  c clear filter  h help", "")
    else:
        foot = ("q quit  p pause  s sort  g group  / filter  h help", "dim")
    lines: list[tuple[str, str]] = [(head, "reverse bold")]
    if snap is None:
        lines.append(("starting: first look at the sockets of every namespace...", ""))
        body: list[tuple[str, str]] = []
    else:
        lines.append((status_line(snap), "bold" if snap.status.get("lost") else ""))
        lines.append((rates_line(snap), ""))
        lines.append(("totals: " + totals_line(snap, vs.view_filter), ""))
        body = []
        parts = sockets_parts(snap, 8 if width >= 60 else 0)
        sock = "sockets: " + "  ".join(parts) if parts else (
            "sockets: (no look yet)" if snap.status.get("looks", True) else "sockets: (--poll-interval 0: no look)")
        body.append((sock, ""))
        if len(snap.rate_trend) > 1 and height >= 16:
            body.append(("new/s " + spark(snap.rate_trend, max(0, width - 6)), "green"))
        room = height - len(lines) - len(body) - 1  # the footer
        findings = [(f"{f.severity.upper()} {f.kind}: {f.summary}", SEVERITY_STYLE.get(f.severity, ""))
                    for f in snap.findings]
        messages = [(m, "yellow") for m in snap.messages[-2:]]
        want_find = min(len(findings), 3 if height >= 20 else 1) if height >= 12 else 0
        want_msg = min(len(messages), 1 if height >= 14 else 0)
        times = time_lines(snap, 5 if height >= 30 else 4) if height >= 20 else []
        room -= want_find + want_msg + len(times)
        groups = GROUPS if vs.group == "all" else (vs.group,)
        if vs.group == "all" and room < 3 * 3:  # too low for three tables: the first that fits
            groups = groups[:max(1, room // 3)]
        per = max(0, room // len(groups) - 1)
        for g in groups:
            body += [(t, "bold" if i == 0 else "") for i, t in enumerate(table_lines(snap, g, vs, width, per))]
        body += [(t, "bold" if i == 0 else "") for i, t in enumerate(times)]
        body += findings[:want_find] + messages[-want_msg:] if want_msg else findings[:want_find]
    lines += body
    lines = lines[:height - 1]
    lines += [("", "")] * (height - 1 - len(lines))
    lines.append(foot)
    return [(t[:width], st) for t, st in lines]


def plain_lines(snap: TopSnapshot, top_n: int = 5, said_before: int = 0) -> list[str]:
    """The periodic print when stdout is not a terminal: no escapes, one block per refresh; the
    messages said since said_before (each message once)."""
    out = [f"{time.strftime('%H:%M:%S', time.localtime(snap.taken))} up {snap.elapsed_s:.0f}s: "
           f"{totals_line(snap, None)}; {rates_line(snap)}",
           f"  {status_line(snap)}"]
    if snap.sockets:
        out.append("  sockets: " + ", ".join(f"{k} {v}" for k, v in sorted(snap.sockets.items(), key=lambda kv: -kv[1])))
    for g in ALL_GROUPS:
        for r in snap.rows(g, None, "churn", limit=top_n):
            out.append(f"  {g} {r.name}: new {r.new} closed {r.closed} open {r.open} resets {r.resets} "
                       f"refused {r.refused} timeouts {r.timeouts} churn/s {_rate(r.churn)}")
    for f in snap.findings:
        out.append(f"  {f.severity.upper()} {f.kind}: {f.summary}")
    for m in snap.messages[len(snap.messages) - min(len(snap.messages), snap.said - said_before):]:
        out.append(f"  {m}")
    return out


# -- the screen ------------------------------------------------------------------------------------
def run_screen(runner: TopRunner, duration: float | None, refresh_s: float) -> None:
    """The full-screen view until q, a signal, --duration or the consumer's end."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    vs = ViewState()
    stop = StopRequest()
    deadline = time.monotonic() + duration if duration else None
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    old = None
    if fd is not None:
        import termios
        import tty
        old = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def draw():
        try:  # the terminal's own size, read each time (COLUMNS/LINES in the environment may be stale)
            w, h = os.get_terminal_size(console.file.fileno())
        except (OSError, ValueError, AttributeError):
            w, h = console.size
        console.size = (w, h)
        snap = vs.paused if vs.paused is not None else runner.latest
        text = Text()
        for i, (line, style) in enumerate(screen_lines(snap, vs, w, h)):
            if i:
                text.append("\n")
            text.append(line, style=style or None)
        return text

    try:
        with Live(draw(), console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as live:
            next_draw = 0.0
            while not stop.requested and not runner.stopped():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now >= next_draw:
                    live.update(draw(), refresh=True)
                    next_draw = now + min(refresh_s, 1.0)
                wait = max(0.01, min(next_draw - time.monotonic(), 0.25))
                if fd is None:
                    time.sleep(wait)
                    continue
                try:
                    ready, _, _ = select.select([fd], [], [], wait)
                except InterruptedError:
                    continue
                if not ready:
                    continue
                data = os.read(fd, 64).decode("utf-8", "replace")
                if not data:  # the terminal went away
                    break
                quit_ = False
                for ch in _keys(data):
                    if vs.editing is None and ch in ("p", " "):
                        vs.toggle_pause(runner.latest)
                    elif not vs.key(ch):
                        quit_ = True
                        break
                if quit_:
                    break
                next_draw = 0.0
    finally:
        if old is not None:
            import termios
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _keys(data: str):
    """The characters typed; an escape sequence (an arrow key) is skipped, a lone Esc kept."""
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b" and i + 1 < len(data) and data[i + 1] in "[O":
            i += 2
            while i < len(data) and not data[i].isalpha() and data[i] != "~":
                i += 1
            i += 1
            continue
        yield ch
        i += 1


def run_plain(runner: TopRunner, duration: float | None, refresh_s: float, out=None) -> None:
    """stdout not a terminal: one block of plain lines per refresh until a signal or --duration."""
    out = out or sys.stdout
    stop = StopRequest()
    deadline = time.monotonic() + duration if duration else None
    printed, said = None, 0
    next_print = time.monotonic() + refresh_s
    while not stop.requested and not runner.stopped():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now >= next_print and runner.latest is not None and runner.latest is not printed:
            printed = runner.latest
            try:
                out.write("\n".join(plain_lines(printed, said_before=said)) + "\n")
                said = printed.said
                out.flush()
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                break
            next_print = now + refresh_s
        time.sleep(0.05)


def run(settings: prog.Settings, *, duration: float | None = None, refresh_s: float = 1.0, poll_interval: float = 2.0,
        record_path: str | None = None, record_host: str | None = None, thresholds=None, plain: bool | None = None,
        on_started=None) -> tuple[dict, list[str]]:
    """Run top until q (screen), a signal or `duration`; returns (the session's report, the
    notices still to say: the screen's, at the end). plain: the periodic print (default: when
    stdout is not a terminal), which says them at the start on stderr."""
    runner = TopRunner(settings, record_path=record_path, record_host=record_host, poll_interval=poll_interval,
                       refresh_s=refresh_s, thresholds=thresholds)
    if on_started:
        on_started(runner)
    runner.start()
    plain = plain if plain is not None else not sys.stdout.isatty()
    notices = runner.notices
    if plain:  # said now, on stderr, as the trace says them (on the screen they would be drawn over)
        s = runner.session
        sys.stderr.write(f"tcplife-trace top: tracing ({len(s.program.source.tracepoints)} tracepoints, ready in "
                         f"{s.startup_s:.2f} s); a block every {refresh_s:g} s on stdout\n"
                         + "".join(f"tcplife-trace: notice: {n}\n" for n in notices))
        sys.stderr.flush()
        notices = []
    try:
        if plain:
            run_plain(runner, duration, refresh_s)
        else:
            run_screen(runner, duration, refresh_s)
    finally:
        runner.request_stop()
        report = runner.stop()
    return report, notices
