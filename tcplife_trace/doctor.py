"""`tcplife-trace doctor`: a snapshot, a short trace, then findings ranked with evidence.

    report = doctor.run(duration_s=10)
    report["findings"]  # list of analysis.leaks.Finding, most severe first
"""
from __future__ import annotations

from collections.abc import Callable

from tcplife_trace.analysis import leaks
from .diagnosis import Watch
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters
from .session import DETECTOR_KEYS, Session

DEFAULT_DURATION_S = 10.0
DEFAULT_INTERVAL_S = 2.0


def run(settings: prog.Settings | None = None, *, duration_s: float = DEFAULT_DURATION_S,
        interval_s: float = DEFAULT_INTERVAL_S, thresholds: leaks.Thresholds | None = None,
        on_finding: Callable[[leaks.Finding], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_ready: Callable[[], None] | None = None, filters: Filters | None = None,
        recorder=None, wall_offset_ns: int | None = None,
        on_tick: Callable[[float], None] | None = None) -> dict:
    """Attach the tracer, seed from a full snapshot, trace for duration_s polling every
    interval_s, then judge on a final full snapshot. Returns a report dict.
    duration_s == 0: one full snapshot judged at once, no tracer (owners from /proc, ages from
    the kernel's clocks). filters (or settings.filters): the findings and the trace obey
    -p/-L/-D/-4/-6. on_ready runs once tracing and the first snapshot are in place (tests start
    workloads there). recorder: a recording.RecordingWriter (settings in mode "stream") gets every
    event and every snapshot, for `analyze` later. on_tick(seconds left) runs as the trace
    waits (a countdown: progress.countdown)."""
    if filters is None:
        filters = settings.filters if settings is not None else Filters()
    if duration_s <= 0:
        return _instant(thresholds, filters, on_ready)
    # the doctor wants endings and open connections, never single transitions: the kernel
    # folds each connection and the traced machine pays the least
    with Session(settings or prog.Settings(filters, mode="aggregate"), poll_interval_s=interval_s,
                 detectors=True, thresholds=thresholds, filters=filters, recorder=recorder,
                 wall_offset_ns=wall_offset_ns, on_finding=on_finding, final_full=True) as session:
        session.seed()  # after attaching: nothing falls between snapshot and trace
        if on_ready:
            on_ready()
        trace_report = session.run(duration_s, should_stop=should_stop, on_tick=on_tick)
    # the trace's own report, without the detectors' keys (the doctor's report has its own)
    trace_report = {k: v for k, v in trace_report.items() if k not in DETECTOR_KEYS}
    return _report(session.watch, session.seed_snapshot, session.seed_counts, trace_report)


def _instant(thresholds, filters: Filters, on_ready) -> dict:
    """`--duration 0`: what one full snapshot shows, judged at once."""
    watch = Watch(thresholds, filters=filters)
    seed = watch.take_seed()
    watch.judge(seed)
    if on_ready:
        on_ready()
    return _report(watch, seed, watch.latest_counts, None)


def _report(watch: Watch, seed, seed_counts: dict, trace_report: dict | None) -> dict:
    final = watch.latest
    return {
        # the last look's findings, then those an earlier look showed and the last no longer did
        "findings": watch.all_findings(),
        "sockets_at_start": seed_counts,
        "sockets_at_end": watch.latest_counts,
        "namespaces": len(final.netns_names),
        "netns_names": final.netns_names,
        "snapshot_s": round(seed.took_s, 3),
        "last_look_at": watch.iso(final.taken_ns),  # when the snapshot the findings judge was taken
        "snapshot_errors": list(watch.errors),  # namespaces (or owners) that could not be read
        "filters": watch.filters.describe() if watch.filters is not None else "none",
        "trace": trace_report,                  # None for --duration 0: no tracer
    }


def exit_status(findings: list[leaks.Finding], fail_on: str) -> int:
    """0 healthy, 1 when a finding still present at the end is at or above fail_on (one that
    resolved during the look is reported, not counted)."""
    bar = leaks.SEVERITY_RANK[fail_on]
    return 1 if any(leaks.SEVERITY_RANK[f.severity] >= bar for f in findings if f.resolved_at is None) else 0
