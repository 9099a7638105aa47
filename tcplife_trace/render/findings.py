"""Findings as text lines and JSON records."""
from __future__ import annotations

import json

from tcplife_trace.analysis.leaks import Finding


def one_line(f: Finding) -> str:
    return f"{f.severity.upper()} {f.kind}{_resolved(f)}: {f.summary}"


def _resolved(f: Finding) -> str:
    """' (resolved at HH:MM:SS)' for a finding an earlier look showed and the last no longer did."""
    if not f.resolved_at:
        return ""
    return f" (resolved at {f.resolved_at[11:19]} UTC)"


def block(f: Finding, names: dict[int, str] | None = None) -> str:
    names = names or {}
    head = f"{f.severity.upper():8} {f.kind}{_resolved(f)}  x{f.count}"
    where = []
    if f.netns is not None:
        where.append(f"netns {names.get(f.netns, f.netns)}")
    if f.owner_pid is not None:
        where.append(f"pid {f.owner_pid} ({f.owner_comm})")
    if f.rate_per_s:
        where.append(f"{f.rate_per_s:g}/s")
    lines = [head + ("  " + ", ".join(where) if where else ""), f"  {f.summary}"]
    if f.samples:
        lines.append("  sockets: " + "; ".join(f.samples))
    ev = {k: v for k, v in f.evidence.items() if v not in (None, [], {}, 0)}
    if ev:
        lines.append("  evidence: " + json.dumps(ev, separators=(", ", "=")).strip("{}").replace('"', ""))
    lines.append(f"  advice: {f.advice}")
    return "\n".join(lines)


def report_text(report: dict) -> str:
    tr = report["trace"]
    counts = report["sockets_at_start"]
    total = sum(counts.values())
    lines = [(f"sockets at start: {total} in {report['namespaces']} network namespace(s): "
              + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))]
    for e in report.get("snapshot_errors") or []:
        lines.append(f"NOT READ: {e}")
    if tr is None:
        lines.append("one snapshot, not traced (--duration 0): ages are those the kernel's clocks prove")
    else:
        lines.append(f"traced {tr['duration_s']:.1f} s: {tr['connections_seen']} connections, "
                     f"{tr['closed']} closed, {tr['events_received']} events, {tr['events_lost']} lost")
    if report.get("filters", "none") != "none":
        lines.append(f"filters: {report['filters']}")
    findings = report["findings"]
    resolved = sum(1 for f in findings if f.resolved_at)
    if not findings:
        lines.append("no findings: healthy")
    else:
        lines.append(f"{len(findings)} finding(s)" + (f" ({resolved} resolved before the end)" if resolved else "")
                     + ", most severe first:")
        lines += [block(f, report.get("netns_names")) for f in findings]
    return "\n".join(lines)


def report_json(report: dict) -> str:
    doc = dict(report)
    doc["findings"] = [f.as_dict() for f in report["findings"]]
    doc.pop("netns_names", None)
    return json.dumps(doc)
