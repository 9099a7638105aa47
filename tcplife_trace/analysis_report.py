"""What `tcplife-trace analyze` shows: frames of a recording, filtered, as tables or data."""
from __future__ import annotations

import os
import tempfile

import pandas as pd

from tcplife_trace.analysis import evidence, leaks
from .frames.schema import conform, to_arrow
from tcplife_trace.probes.filters import Filters
from .recording import Recording

TOP = 10
FINDINGS_SHOWN = 20  # in the text report; the rest are summed up by kind


def filtered(rec: Recording, filters: Filters, since: pd.Timestamp | None,
             until: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lifecycles, transitions) restricted to the filters and the time window; the
    recording's frames already hold only what each file's own recorded filters keep (unless
    loaded with all_recorded), and these filters must hold too, by the same rule."""
    from .frames.filters import kept
    lc = rec.lifecycles()
    tr = rec.transitions
    keep = pd.Series(True, index=lc.index)
    if filters.active():
        keep &= kept(lc, rec.columns(), filters)
    if since is not None:
        keep &= lc.end.isna() | (lc.end >= since)
        tr = tr[tr.time >= since]
    if until is not None:
        keep &= lc.start <= until
        tr = tr[tr.time <= until]
    if not keep.all():  # (a no-op filter copies nothing: 10M transitions are 1 GB)
        lc = lc[keep.to_numpy()]
        tr = tr[tr.conn_id.isin(lc.conn_id)]
    return lc, tr


def frames(rec: Recording, filters: Filters, since=None, until=None,
           thresholds=None) -> dict[str, pd.DataFrame]:
    """Every frame analyze shows: each file's recorded filters (see Recording) and `filters`."""
    from .frames.connections import state_durations, summary
    from .frames.filters import both
    from .frames.leaks import findings, stopped_at
    lc, tr = filtered(rec, filters, since, until)
    if since is None and until is None:  # whole connections: the recording's own, no recount
        durations = rec.state_durations()
        if len(lc) < len(rec.lifecycles()):
            durations = durations[durations.conn_id.isin(lc.conn_id)].reset_index(drop=True)
    else:                                # the time spent in states left inside the window
        durations = state_durations(tr)
    stopped = stopped_at(rec.ends)
    if until is not None and stopped is not None:
        stopped = min(stopped, until)
    snaps = [x for x in rec.snapshot_list if until is None or x[0] <= until.value]
    sockets = rec.snapshots()
    if since is not None:
        sockets = sockets[sockets.time >= since]
    if until is not None:
        sockets = sockets[sockets.time <= until]
    recorded = rec.snapshot_filters()
    scope = both(recorded, filters) if recorded is not None else filters
    out = {"lifecycles": lc, "transitions": tr, "state_durations": durations,
           "summary": summary(durations).reset_index(),
           "leaks": findings(lc, tr, thresholds, stopped=stopped, snapshots=snaps, filters=scope),
           "snapshots": evidence.sockets_matching(sockets, scope).reset_index(drop=True)}
    return {name: conform(name, df) for name, df in out.items()}


def peer_health(snapshots: pd.DataFrame) -> pd.DataFrame:
    """Per peer address, from the socket snapshots' tcp_info (each connection's latest look that
    had it: netns, laddr, lport, raddr, rport): connections, their median and largest smoothed
    RTT, the smallest min RTT, retransmitted segments and bytes summed, and how many connections
    retransmitted. Slowest first. Empty without snapshots that carry health (older recordings)."""
    cols = ["raddr", "connections", "rtt_ms_median", "rtt_ms_max", "min_rtt_ms", "total_retrans",
            "bytes_retrans", "retransmitting"]
    if "rtt_ms" not in snapshots:
        return pd.DataFrame(columns=cols)
    have = snapshots[snapshots["rtt_ms"].notna() | snapshots["total_retrans"].notna()]
    if have.empty:
        return pd.DataFrame(columns=cols)
    keys = ["netns", "laddr", "lport", "raddr", "rport"]
    last = have.sort_values("time", kind="stable").drop_duplicates(keys, keep="last")
    g = last.groupby("raddr", observed=True, sort=False)
    out = pd.DataFrame({
        "connections": g.size(), "rtt_ms_median": g["rtt_ms"].median(), "rtt_ms_max": g["rtt_ms"].max(),
        "min_rtt_ms": g["min_rtt_ms"].min(), "total_retrans": g["total_retrans"].sum(min_count=1),
        "bytes_retrans": g["bytes_retrans"].sum(min_count=1),
        "retransmitting": g["total_retrans"].apply(lambda v: int((v.fillna(0) > 0).sum())),
    }).reset_index()
    out["raddr"] = out["raddr"].astype(str)
    return out.sort_values("rtt_ms_median", ascending=False, na_position="last", kind="stable")[cols] \
        .reset_index(drop=True)


def peer_health_at_close(lifecycles: pd.DataFrame) -> pd.DataFrame:
    """Per peer address, from each connection's health read by the kernel at its CLOSE and its
    handshake (the lifecycles frame, recordings of schema 3): connections with health, median
    and largest smoothed RTT at close, the smallest min RTT, segments retransmitted
    (total_retrans) and retransmits counted as they happened summed, how many connections
    retransmitted, and handshake ms at p50/p90/p99. Slowest first; empty without such columns."""
    cols = ["raddr", "connections", "rtt_ms_median", "rtt_ms_max", "min_rtt_ms", "total_retrans",
            "retransmits", "retransmitting", "handshake_ms_p50", "handshake_ms_p90", "handshake_ms_p99"]
    if "rtt_ms" not in lifecycles:
        return pd.DataFrame(columns=cols)
    have = lifecycles[lifecycles["rtt_ms"].notna() | lifecycles["total_retrans"].notna()
                      | lifecycles["handshake_ms"].notna()]
    have = have[have["raddr"].notna()]
    if have.empty:
        return pd.DataFrame(columns=cols)
    g = have.groupby("raddr", observed=True, sort=False)
    hs = g["handshake_ms"]
    out = pd.DataFrame({
        "connections": g.size(), "rtt_ms_median": g["rtt_ms"].median(), "rtt_ms_max": g["rtt_ms"].max(),
        "min_rtt_ms": g["min_rtt_ms"].min(), "total_retrans": g["total_retrans"].sum(min_count=1),
        "retransmits": g["retransmits"].sum(min_count=1),
        "retransmitting": g["total_retrans"].apply(lambda v: int((v.fillna(0) > 0).sum())),
        "handshake_ms_p50": hs.quantile(0.5), "handshake_ms_p90": hs.quantile(0.9),
        "handshake_ms_p99": hs.quantile(0.99),
    }).reset_index()
    out["raddr"] = out["raddr"].astype(str)
    return out.sort_values("rtt_ms_median", ascending=False, na_position="last", kind="stable")[cols] \
        .reset_index(drop=True)


def _close_health_text(lifecycles: pd.DataFrame) -> list[str]:
    peers = peer_health_at_close(lifecycles)
    if peers.empty:
        return []
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    out = [f"\nslowest peers by RTT at close (the kernel's read of each connection's tcp_sock; top {TOP})",
           peers.head(TOP).to_string(index=False, float_format=fmt)]
    retrans = peers[peers.total_retrans.fillna(0) > 0].sort_values("total_retrans", ascending=False, kind="stable")
    if len(retrans):
        out.append(f"\nmost retransmits per peer at close (top {TOP})")
        out.append(retrans.head(TOP).to_string(index=False, float_format=fmt))
    slow = peers[peers.handshake_ms_p50.notna()].sort_values("handshake_ms_p90", ascending=False, kind="stable")
    if len(slow):
        out.append(f"\nhandshake ms per peer, slowest p90 first (top {TOP})")
        out.append(slow.head(TOP)[["raddr", "connections", "handshake_ms_p50", "handshake_ms_p90",
                                   "handshake_ms_p99"]].to_string(index=False, float_format=fmt))
    return out


def _health_text(snapshots: pd.DataFrame) -> list[str]:
    peers = peer_health(snapshots)
    if peers.empty:
        return []
    out = [f"\nslowest peers by RTT (socket snapshots' tcp_info, each connection's last look; top {TOP})",
           peers.head(TOP).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    retrans = peers[peers.total_retrans.fillna(0) > 0].sort_values("total_retrans", ascending=False, kind="stable")
    if len(retrans):
        out.append(f"\nmost retransmits per peer (top {TOP})")
        out.append(retrans.head(TOP).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return out


def applied(rec: Recording) -> list[str]:
    """Per file, in words: the filters it was recorded with and whether its frames apply them."""
    out = []
    for f, rf in zip(rec.applied_filters, rec.recorded_filters, strict=True):
        if rf is None:
            out.append("unreadable, not applied (--all-recorded)")
        elif not rf.active():
            out.append("none")
        elif f.active():
            out.append(f"{rf.describe()} (applied, as the live session did; --all-recorded shows everything "
                       "that reached the file)")
        else:
            out.append(f"{rf.describe()} (not applied: --all-recorded)")
    return out


def export(frames_: dict[str, pd.DataFrame], directory: str, host: bool = False) -> list[str]:
    """Each frame as DIR/<name>.parquet in its declared schema (frames/schema.py), created mode
    0600 like the recording (they hold the same addresses and process names), each written
    whole under a temporary name first (an earlier export of the same name is replaced only
    by a complete file). host: fleet frames, a `host` column first."""
    import pyarrow.parquet as pq
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    written = []
    for name, df in frames_.items():
        table = to_arrow(name, df, host=host and name != "summary")
        path = os.path.join(directory, f"{name}.parquet")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".parquet", dir=directory)  # (mode 0600)
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        written.append(path)
    return written


def text(rec: Recording, f: dict[str, pd.DataFrame]) -> str:
    lc, tr = f["lifecycles"], f["transitions"]
    out = []
    for h, e, said in zip(rec.headers, rec.ends, applied(rec), strict=True):
        if h.get("imported_from"):
            cap = h.get("capture") or {}
            out.append(f"imported from {h['imported_from']}: {h.get('source')}; host "
                       + (h.get("host") or "unknown (--host)")
                       + (f"; first line on {cap['first_day']} ({cap['day_from']}), times in {cap['tz']} "
                          f"({cap['tz_from']})" if cap else ""))
            continue
        lost = "?" if e is None else e.get("events_lost", "?")
        out.append(f"recording of {h.get('host')} (kernel {h.get('kernel')}), recorded filters {said}: "
                   f"{e.get('events', '?') if e else '?'} events, lost in kernel {lost}"
                   + ("" if e else "  [not closed cleanly]"))
    if rec.snapshot_list:
        t, meta, socks = rec.snapshot_list[-1]
        from .frames.leaks import snapshot_kind
        kind = snapshot_kind(meta)
        out.append(f"socket snapshots: {len(rec.snapshot_list)}; the last ({kind}) at "
                   f"{pd.Timestamp(t, unit='ns', tz='UTC').isoformat()}: "
                   + (", ".join(f"{k} {v}" for k, v in socks["state"].value_counts().items()) or "no sockets"))
    ends = lc.end_reason.value_counts()
    out.append(f"{len(lc)} connections, {len(tr)} transitions; ended: "
               + (", ".join(f"{k} {v}" for k, v in ends.items() if v) or "none"))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        if len(f["summary"]):
            out.append("\ntime in state (seconds; count = connections that spent time there)")
            out.append(f["summary"].to_string(index=False, float_format=lambda v: f"{v:.6f}"))
        cols = ["conn_id", "role", "pid", "comm", "laddr", "lport", "raddr", "rport", "duration_s",
                "end_reason"]
        longest = lc[lc.duration_s.notna()].nlargest(TOP, "duration_s")
        if len(longest):
            out.append(f"\nlongest connections (top {TOP})")
            out.append(longest[cols].to_string(index=False))
        still = lc[lc.end_reason == "open"]
        if len(still):
            out.append(f"\nopen at the end of the recording ({len(still)})")
            out.append(still[cols[:-2] + ["start"]].head(TOP).to_string(index=False))
    out += _close_health_text(lc)
    out += _health_text(f["snapshots"])
    lk = f["leaks"]
    out.append(f"\nfindings ({len(lk)})" + ("" if len(lk) else ": none"))
    for r in lk.head(FINDINGS_SHOWN).itertuples():
        out.append(f"  {r.severity.upper()} {r.kind}: {r.summary}")
    if len(lk) > FINDINGS_SHOWN:
        rest = lk.iloc[FINDINGS_SHOWN:].groupby(["kind", "severity"], observed=True).size()
        out.append(f"  ... and {len(lk) - FINDINGS_SHOWN} more: "
                   + ", ".join(f"{n} {kind} ({sev})" for (kind, sev), n in rest.sort_values(ascending=False).items())
                   + "; all of them: --format json, or --export DIR (leaks.parquet)")
    return "\n".join(out)
