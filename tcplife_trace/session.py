"""The one live session that the CLI's trace, `serve`, `doctor` and a notebook all use: the
tracer (live.LiveSession), the detectors (diagnosis.Watch, a look at every socket on an
interval while the recording is pumped), the metrics refresh, the snapshot recording, the
recorder's failure notice, and the report keys of the detectors (findings, sockets_at_start,
socket_polls, socket_poll_max_s, snapshot_errors). The caller gets lines and objects through
callbacks and prints them; nothing here writes to a terminal.

    from tcplife_trace.session import Session
    with Session(poll_interval_s=2) as s:   # Settings() by default: every transition
        s.seed()                            # the first look at every socket
        report = s.run(duration_s=5)
    report["findings"], report["sockets_at_start"], report["end_reasons"]
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .live import LiveSession
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from .render.views import OPEN_HEALTH_KEY

# the report keys the detectors add to the tracer's report
DETECTOR_KEYS = ("socket_polls", "socket_poll_max_s", "sockets_at_start", "findings", "snapshot_errors")


def counts_in_kernel(metrics, filters: Filters) -> bool:
    """Whether the metrics' transitions, connections opened and time in state come from the
    kernel's counts (Metrics.count_in_kernel): without opt-in labels and user-space filters,
    which need each transition's Lifecycle."""
    return metrics is not None and not metrics.labels and not filters.active()


def kernel_mode(*, transitions: bool, recording: bool, metrics=None, filters: Filters | None = None) -> str:
    """What the kernel must send for a session: "stream" (every transition) when something
    wants each one (a per-transition view, a recording of every event, metrics that count
    Lifecycle transitions), else "aggregate": one folded record per connection at its end,
    far less work per connection on both sides of the ring."""
    if transitions or recording or (metrics is not None and not counts_in_kernel(metrics, filters or Filters())):
        return "stream"
    return "aggregate"


class Session:
    """A LiveSession with the detectors and metrics around it.

    detectors: run diagnosis.Watch (a seed look, a look every poll_interval_s when that is
    above 0, a last look at the end). final_full: the last look reads every socket (doctor)
    and the connections the tracker holds back (errno hold) are judged before it; otherwise
    it reads the states the detectors watch (trace, serve). on_notice(text), on_finding(f),
    on_recorder_failed(text) are said once each, as they happen. on_batch(events) gets each
    batch's events as columns (EVENT_DTYPE, see LiveSession), before the metrics count them."""

    def __init__(self, settings: prog.Settings | None = None, *, poll_interval_s: float = 0.0,
                 detectors: bool | None = None, thresholds=None, filters: Filters | None = None,
                 metrics=None, recorder=None, wall_offset_ns: int | None = None,
                 on_transition: Callable | None = None, on_close: Callable | None = None,
                 on_loss: Callable[[int, int, str], None] | None = None,
                 on_finding: Callable | None = None, on_notice: Callable[[str], None] | None = None,
                 on_recorder_failed: Callable[[str], None] | None = None, final_full: bool = False,
                 on_batch: Callable | None = None):
        self.settings = settings or prog.Settings()
        self.filters = filters if filters is not None else self.settings.filters
        self.poll_interval_s = poll_interval_s
        self.detectors = poll_interval_s > 0 if detectors is None else detectors
        self.thresholds = thresholds
        self.metrics = metrics
        self.recorder = recorder
        self.final_full = final_full
        self.on_finding, self.on_notice, self.on_recorder_failed = on_finding, on_notice, on_recorder_failed
        handler = on_transition
        # without opt-in labels and user-space filters the kernel counts the transitions
        # (Metrics.count_in_kernel): no event is needed for them, and with no other
        # per-transition consumer the tracker follows the folds alone
        in_kernel = counts_in_kernel(metrics, self.settings.filters)
        if metrics is not None and not in_kernel:
            counted = metrics.on_transition
            if on_transition is None:
                handler = counted
            else:
                def handler(t):
                    on_transition(t)
                    counted(t)
        try:
            self.live = LiveSession(self.settings, on_transition=handler, on_close=on_close, on_loss=on_loss,
                                    recorder=recorder, wall_offset_ns=wall_offset_ns, on_batch=on_batch)
        except BaseException:
            if recorder is not None:  # nothing was recorded: leave no empty file behind
                recorder.discard()
            raise
        if in_kernel:
            metrics.count_in_kernel(self.live)
        if metrics is not None:
            self.live.close_watchers.append(metrics.on_close)
            if not metrics.labels:  # counted from columns when the folds are (analysis/closes.py)
                self.live.column_watchers[metrics.on_close] = metrics.closed_columns
            metrics.update(self.live.counts_now())  # every loss series at 0 from the first scrape
        self.watch = None
        self.seed_snapshot = None
        self.seed_counts: dict | None = None
        self.poll_s: list[float] = []  # how long each look at the sockets held the consumer up
        self._next_poll = 0.0
        self._next_metrics = 0.0
        self._said_recorder = False
        self.report: dict | None = None
        # conn_id -> health (probes/health.COLUMNS) of the connections still open at the end,
        # from the detectors' last look at the sockets (finish): see open_health()
        self.open_health: dict = {}

    # what the caller reads
    @property
    def clock(self):
        return self.live.clock

    @property
    def notices(self) -> list[str]:
        return self.live.notices

    @property
    def still_open(self) -> list:
        """The connections open at the end (after run/finish)."""
        return self.live.still_open

    def serve_metrics(self, port: int, addr: str = "127.0.0.1") -> None:
        """The Prometheus endpoint; OSError (port taken, address not ours) stops the session."""
        from . import metrics as metrics_mod
        self.metrics.attach(self.live, port, addr)
        try:
            metrics_mod.serve(self.metrics, port, addr)
        except OSError:
            self.live.stop()
            raise

    def seed(self) -> None:
        """The detectors' first look at every socket (when detectors run), then the notices
        so far. The detectors' import and that look take a second or two: the recording goes
        on meanwhile (LiveSession.pumping), so a SIGKILL loses at most the last second."""
        if self.detectors:
            with self.live.pumping():
                from .diagnosis import Watch
                from tcplife_trace.probes import sock_diag
                states = sock_diag.POLL_STATES | (1 << sock_diag.S.ESTABLISHED) if self.metrics else sock_diag.POLL_STATES
                self.watch = Watch(self.thresholds, tracker=self.live.tracker, filters=self.filters,
                                   poll_states=states, open_lifecycles=self.live.open_lifecycles)
                self.live.close_watchers.append(self.watch.closed)
                self.live.column_watchers[self.watch.closed] = self.watch.closed_columns
                if self.recorder is not None:  # the sockets each look saw go into the recording too
                    self.watch.record_into(self.recorder)
                self.seed_snapshot = self.watch.take_seed()  # after attaching: nothing falls between
                self.seed_counts = self.watch.latest_counts
                self._next_poll = time.monotonic() + self.poll_interval_s
        for notice in self.live.notices:
            self._notice(notice)
        self._socket_errors()

    def _notice(self, text: str) -> None:
        if self.on_notice:
            self.on_notice(text)

    def _socket_errors(self) -> None:
        for e in self.watch.new_errors() if self.watch is not None else ():  # a namespace (or owners) not read
            self._notice(f"sockets not read: {e}")

    def step(self, timeout_ms: int = 100) -> int:
        """One poll of the kernel's buffers, then whatever is due: the recorder's failure
        notice, a look at the sockets, the metrics refresh. Returns the events that arrived."""
        n = self.live.poll(timeout_ms)
        rec = self.recorder
        if rec is not None and rec.failed and not self._said_recorder:
            self._said_recorder = True  # once, at once; tracing goes on
            if self.on_recorder_failed:
                self.on_recorder_failed(rec.failed)
        if self.watch is not None and self.poll_interval_s > 0 and time.monotonic() >= self._next_poll:
            self.look()
        if self.metrics is not None and time.monotonic() >= self._next_metrics:
            self._next_metrics = time.monotonic() + 1.0
            w = self.watch
            self.metrics.update(self.live.counts_now(), w.latest_counts if w is not None else None,
                                w.current if w is not None else None)
        return n

    def look(self) -> list:
        """A look at every socket now, the recording pumped meanwhile; returns its findings."""
        t0 = time.monotonic()
        with self.live.pumping():
            found = self.watch.poll()
        for f in found:
            if self.on_finding:
                self.on_finding(f)
        self._socket_errors()
        self.poll_s.append(time.monotonic() - t0)
        if self.metrics is not None:
            self.metrics.on_socket_poll(self.poll_s[-1])
        self._next_poll = time.monotonic() + self.poll_interval_s
        return found

    def run(self, duration_s: float | None = None, *, should_stop: Callable[[], bool] = lambda: False,
            on_tick: Callable[[float], None] | None = None,
            after_poll: Callable[[], None] | None = None) -> dict:
        """Poll until duration_s (None: until should_stop()), then finish(). on_tick(seconds
        left) before each poll of a timed run; after_poll() after each (the CLI writes its
        lines there)."""
        deadline = time.monotonic() + duration_s if duration_s else None
        while not should_stop():
            timeout = 100
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if on_tick:
                    on_tick(left)
                timeout = max(1, min(timeout, int(left * 1000)))
            self.step(timeout)
            if after_poll:
                after_poll()
        return self.finish()

    def finish(self) -> dict:
        """The detectors' last look, then the tracer's report with the detectors' keys."""
        if self.report is not None:
            return self.report
        findings = None
        if self.watch is not None:
            self.live.poll(0)
            if self.final_full:  # the connections held back (errno hold) are judged too
                self.live.release_held(time.monotonic_ns() + self.live.tracker.hold_ns)
                self.watch.final()
                findings = True
            else:
                self.live.release_held(time.monotonic_ns())  # the endings due, counted before the look
                with self.live.pumping():
                    findings = self.watch.final(full=False)
        report = self.live.stop()
        if self.watch is not None and self.watch.latest is not None:
            self.open_health = open_health(self.live.still_open, self.watch.latest.sockets)
        elif self.live.still_open:  # no detectors (--poll-interval 0): one look for their health
            from tcplife_trace.probes import sock_diag, socket_snapshot
            from tcplife_trace.probes.tcp_states import TcpState as S
            full = sock_diag.ALL_STATES & ~((1 << S.TIME_WAIT) | (1 << S.LISTEN) | (1 << S.SYN_RECV))
            snap = socket_snapshot.take(full, owners=False)  # (a namespace it cannot read: not joined)
            self.open_health = open_health(self.live.still_open, snap.sockets)
        if findings is not None:
            report["socket_polls"] = len(self.poll_s)
            report["socket_poll_max_s"] = round(max(self.poll_s, default=0.0), 3)
            report["sockets_at_start"] = self.seed_counts
            # every finding of the run: those resolved before the end too, with resolved_at
            report["findings"] = [f.as_dict() for f in self.watch.all_findings()]
            report["snapshot_errors"] = list(self.watch.errors)
        self.report = report
        return report

    def stop(self) -> dict:
        """The tracer stopped at once (the reader went away): its report, no last look."""
        if self.report is None:
            self.report = self.live.stop()
        return self.report

    def degraded(self) -> bool:
        return self.live.degraded()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def open_health(lifecycles, sockets) -> dict:
    """conn_id -> the health a look at the sockets read (sock_diag.Sock.health: tcp_info) of
    each of these lifecycles whose kernel fold read none (connections still open), joined on
    OPEN_HEALTH_KEY; those not found (not a full socket then, not looked at) are left out."""
    by_key = {tuple(getattr(s, k) for k in OPEN_HEALTH_KEY): s.health for s in sockets if s.health}
    out = {}
    for lc in lifecycles:
        if lc.health_raw is None:
            h = by_key.get(tuple(getattr(lc, k) for k in OPEN_HEALTH_KEY))
            if h is not None:
                out[lc.conn_id] = h
    return out
