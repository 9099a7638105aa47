"""`tcplife-trace doctor`: a snapshot, a short trace, then findings ranked with evidence.

    report = doctor.run(duration_s=10)
    report["findings"]  # list of analysis.leaks.Finding, most severe first
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .analysis import leaks
from .diagnosis import Watch
from .live import LiveSession
from .probes import program as prog

DEFAULT_DURATION_S = 10.0
DEFAULT_INTERVAL_S = 2.0


def run(settings: prog.Settings | None = None, *, duration_s: float = DEFAULT_DURATION_S,
        interval_s: float = DEFAULT_INTERVAL_S, thresholds: leaks.Thresholds | None = None,
        on_finding: Callable[[leaks.Finding], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_ready: Callable[[], None] | None = None) -> dict:
    """Attach the tracer, seed from a full snapshot, trace for duration_s polling every
    interval_s, then judge on a final full snapshot. Returns a report dict.
    on_ready runs once tracing and the first snapshot are in place (tests start workloads there)."""
    # the doctor wants endings and open connections, never single transitions: the kernel
    # folds each connection and the traced machine pays the least
    with LiveSession(settings or prog.Settings(mode="aggregate")) as session:
        watch = Watch(thresholds, tracker=session.tracker, open_lifecycles=session.open_lifecycles)
        session.close_watchers.append(watch.closed)
        seed = watch.take_seed()  # after attaching: nothing falls between snapshot and trace
        seed_counts = watch.latest_counts
        if on_ready:
            on_ready()
        deadline = time.monotonic() + duration_s
        next_poll = time.monotonic() + interval_s
        while not should_stop():
            now = time.monotonic()
            if now >= deadline:
                break
            session.poll(max(1, int(min(100, (deadline - now) * 1000))))
            if interval_s > 0 and time.monotonic() >= next_poll:
                next_poll += interval_s
                for f in watch.poll():
                    if on_finding:
                        on_finding(f)
        session.poll(0)
        session.tracker.advance(time.monotonic_ns() + session.tracker.hold_ns)
        findings = watch.final()
        final = watch.latest
        trace_report = session.stop()
    return {
        "findings": findings,
        "sockets_at_start": seed_counts,
        "sockets_at_end": watch.latest_counts,
        "namespaces": len(final.netns_names),
        "netns_names": final.netns_names,
        "snapshot_s": round(seed.took_s, 3),
        "snapshot_errors": seed.errors + final.errors,
        "trace": trace_report,
    }


def exit_status(findings: list[leaks.Finding], fail_on: str) -> int:
    """0 healthy, 1 when a finding is at or above fail_on."""
    bar = leaks.SEVERITY_RANK[fail_on]
    return 1 if any(leaks.SEVERITY_RANK[f.severity] >= bar for f in findings) else 0
