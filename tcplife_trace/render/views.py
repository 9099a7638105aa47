"""Text and JSON renderings of transitions, lifecycles and the exit summary."""
from __future__ import annotations

import datetime as dt
import errno as errno_mod
import json

from .. import containers, invocation
from tcplife_trace.analysis.lifecycle import Lifecycle, Transition
from tcplife_trace.analysis.rules import handshake_ns
from tcplife_trace.probes import health
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.probes.tcp_states import state_name


class Clock:
    """Kernel CLOCK_MONOTONIC ns -> wall clock, with the offset taken once."""

    def __init__(self, wall_offset_ns: int, start_mono_ns: int):
        self.offset = wall_offset_ns
        self.start = start_mono_ns
        self._hms_sec, self._hms = None, ""

    def wall(self, mono_ns: int) -> dt.datetime:
        return dt.datetime.fromtimestamp((mono_ns + self.offset) / 1e9, tz=dt.timezone.utc).astimezone()

    def iso(self, mono_ns: int | None) -> str | None:
        return None if mono_ns is None else self.wall(mono_ns).isoformat(timespec="microseconds")

    def hms(self, mono_ns: int) -> str:
        sec = (mono_ns + self.offset) // 1_000_000_000
        if sec != self._hms_sec:
            self._hms_sec, self._hms = sec, self.wall(mono_ns).strftime("%H:%M:%S")
        return self._hms

    def since_start(self, mono_ns: int) -> float:
        return (mono_ns - self.start) / 1e9


def _ms(ns: int | None, fmt: str = "%.3f") -> str:
    return "-" if ns is None else fmt % (ns / 1e6)


def errno_name(num: int | None) -> str | None:
    return None if num is None else errno_mod.errorcode.get(num, str(num))


class TextView:
    """bcc tcpstates/tcplife-style columns; -w widens for IPv6 and long COMMs."""

    def __init__(self, clock: Clock, *, wide: bool = False, hms: bool = False, seconds: bool = False):
        self.clock = clock
        self.hms = hms
        self.seconds = seconds
        self.wide = wide  # -w: wider addresses and names, and the RTT and retransmits at the end
        self.addr_w = 39 if wide else 15
        self.comm_w = 16 if wide else 12

    def _prefix_header(self) -> str:
        return ("%-8s " % "TIME" if self.hms else "") + ("%-11s " % "TIME(s)" if self.seconds else "")

    def _prefix(self, ts_ns: int) -> str:
        out = ""
        if self.hms:
            out += "%-8s " % self.clock.hms(ts_ns)
        if self.seconds:
            out += "%-11.6f " % self.clock.since_start(ts_ns)
        return out

    def _endpoints(self, lc: Lifecycle) -> str:
        a = self.addr_w
        return "%-*s %-5s %-*s %-5s" % (a, lc.laddr or "-", lc.lport or "-", a, lc.raddr or "-",
                                        lc.rport or "-")

    def _owner(self, lc: Lifecycle) -> str:
        pid = "-" if lc.owner_pid is None else str(lc.owner_pid)
        return "%-7s %-*.*s" % (pid, self.comm_w, self.comm_w, lc.owner_comm or "-")

    def transition_header(self) -> str:
        a, c = self.addr_w, self.comm_w
        return self._prefix_header() + "%-7s %-*s %-*s %-5s %-*s %-5s %-11s -> %-11s %s" % (
            "PID", c, "COMM", a, "LADDR", "LPORT", a, "RADDR", "RPORT", "OLDSTATE", "NEWSTATE", "MS")

    def transition(self, t: Transition) -> str:
        lc = t.lc
        key = (lc.owner_pid, lc.lport, lc.rport, lc.laddr, lc.raddr)
        cached = lc.view_cache
        if cached is None or cached[0] != key:
            cached = lc.view_cache = (key, self._owner(lc) + " " + self._endpoints(lc) + " ")
        line = "%s%s%-11s -> %-11s %s" % (
            self._prefix(t.ts_ns) if self.hms or self.seconds else "", cached[1],
            state_name(t.oldstate), state_name(t.newstate),
            "-" if t.dur_ns is None else "%.3f" % (t.dur_ns / 1e6))
        return line + "  (" + t.note + ")" if t.note else line

    def lifecycle_header(self) -> str:
        return self._prefix_header() + "%s %s %-5s %-5s %-10s %-14s %s%s" % (
            "%-7s %-*s" % ("PID", self.comm_w, "COMM"),
            "%-*s %-5s %-*s %-5s" % (self.addr_w, "LADDR", "LPORT", self.addr_w, "RADDR", "RPORT"),
            "TX_KB", "RX_KB", "MS", "END", "%-9s %-5s " % ("RTT_MS", "RETR") if self.wide else "", "STATES (ms)")

    def lifecycle(self, lc: Lifecycle, *, still_open: bool = False, health: dict | None = None) -> str:
        """health: an open connection's health from the last look at the sockets (lifecycle_extras)."""
        kb = (lambda b: "-" if b is None else str(b // 1024))
        end = "open" if still_open else lc.end_reason + ("+TW" if lc.time_wait else "")
        ts = lc.end_ns if lc.end_ns is not None else lc.last_ns
        return self._prefix(ts) + "%s %s %-5s %-5s %-10s %-14s %s%s" % (
            self._owner(lc), self._endpoints(lc), kb(lc.tx_b), kb(lc.rx_b), lifetime_ms(lc),
            end, _health_cells(lc, health) if self.wide else "", states_compact(lc))


def _health_cells(lc: Lifecycle, seen: dict | None = None) -> str:
    """-w's RTT_MS (smoothed RTT at the end) and RETR (segments retransmitted, tcp_sock's
    total_retrans) cells: '-' where neither the kernel's fold nor the last look gave them."""
    if lc.health_raw is None and seen is None:
        return "%-9s %-5s " % ("-", "-")
    h = health.from_fold(lc.health_raw) if lc.health_raw is not None else seen
    rtt, retr = h["rtt_ms"], h["total_retrans"]
    return "%-9s %-5s " % ("-" if rtt is None else "%.3f" % rtt, "-" if retr is None else retr)


_resolver: containers.Resolver | None = None


def home_columns(cgroup_id: int | None) -> dict[str, object]:
    """containers.COLUMNS of an owner's cgroup id (one Resolver for the process: it caches);
    all None without an id."""
    global _resolver
    if cgroup_id is None:
        return dict.fromkeys(containers.COLUMNS)
    if _resolver is None:
        _resolver = containers.Resolver()
    return _resolver.by_id(cgroup_id).columns()


# how a connection still open at the end is found among the sockets of a look at them
# (sock_diag.Sock, Lifecycle and the frames name these alike): Session.open_health live, the
# lifecycles frame's join on a recording's last snapshot offline (frames/lifecycles.py with_open_health)
OPEN_HEALTH_KEY = ("netns", "laddr", "lport", "raddr", "rport")


def lifecycle_extras(lc: Lifecycle, seen: dict | None = None) -> dict[str, object]:
    """What the kernel's fold adds to a lifecycle's record: the handshake time, retransmits as
    they happened, health at the end (probes/health.COLUMNS) and the owner's home
    (containers.COLUMNS); None (NA) for what is not known. seen: for a connection still open,
    its health from the session's last look at the sockets (Session.open_health), used where
    the fold read none."""
    hs = handshake_ns(lc.role, lc.path, lc.state_ns)
    out = {"handshake_ms": None if hs is None else hs / 1e6, "retransmits": lc.retrans,
           "syn_retransmits": lc.syn_retrans, "recoveries": lc.recoveries, "losses": lc.losses}
    out.update(health.from_fold(lc.health_raw) if lc.health_raw is not None or seen is None
               else {c: seen.get(c) for c in health.COLUMNS})
    out.update(home_columns(lc.cgroup_id))
    return out


def lifetime_ms(lc: Lifecycle) -> str:
    """Total ms; '>N' is a lower bound for a connection born before the trace."""
    if lc.end_ns is None:
        return "-"
    total = "%.2f" % ((lc.end_ns - lc.start_ns) / 1e6)
    return total if lc.birth_seen else ">" + total


_COMPACT: dict[tuple, tuple[str, tuple]] = {}  # shape of a lifecycle -> (format, states timed)


def states_compact(lc: Lifecycle) -> str:
    """'SYN_SENT:0.051 ESTABLISHED:2.401 ... TIME_WAIT': each state once, in path order, with
    its ms; '...' still in it, '?' in it since before the trace. A format per lifecycle shape
    is made once (a busy host has a handful of shapes and millions of lifecycles)."""
    state_ns = lc.state_ns
    key = (tuple(lc.path), lc.birth_seen, lc.closed, lc.state, lc.time_wait, tuple(state_ns))
    shape = _COMPACT.get(key)
    if shape is None:
        parts, timed, seen = [], [], set()
        # a born connection's first entry is the state it was born from (CLOSE, or the listener's LISTEN)
        for st in (lc.path[1:] if lc.birth_seen else lc.path):
            if st in seen or st == S.CLOSE and lc.closed:
                continue
            seen.add(st)
            if st in state_ns:
                parts.append(state_name(st) + ":%.3f")
                timed.append(st)
            else:  # still in it, or in it since before the trace
                parts.append(f"{state_name(st)}:" + ("..." if st == lc.state and not lc.closed else "?"))
        if lc.time_wait:
            parts.append("TIME_WAIT")
        shape = (" ".join(parts), tuple(timed))  # state names hold no '%'; only the timed parts format
        if len(_COMPACT) > 4096:
            _COMPACT.clear()
        _COMPACT[key] = shape
    fmt, timed = shape
    return fmt % tuple([state_ns[st] / 1e6 for st in timed]) if timed else fmt


# what a transition record carries of its connection's home (JSON; the CSV row keeps bcc's columns)
TRANSITION_HOME = ("cgroup_id", "cgroup", "container_id")


def transition_home(cgroup_id: int | None) -> dict[str, object]:
    """TRANSITION_HOME of the owner's cgroup id after a transition (home_columns' values)."""
    h = home_columns(cgroup_id)
    return {k: h[k] for k in TRANSITION_HOME}


def transition_record(t: Transition, clock: Clock, *, home: bool = True) -> dict:
    """A transition as a record; home: with TRANSITION_HOME (the JSON view's; not the CSV's)."""
    lc = t.lc
    record = {
        "type": "transition", "time": clock.iso(t.ts_ns), "ts_ns": t.ts_ns, "conn_id": lc.conn_id,
        "pid": lc.owner_pid, "comm": lc.owner_comm, "owner_source": lc.owner_source,
        "cur_pid": t.cur_pid, "cur_comm": t.cur_comm, "role": lc.role, "family": lc.family,
        "laddr": lc.laddr, "lport": lc.lport or None, "raddr": lc.raddr, "rport": lc.rport or None,
        "netns": lc.netns, "oldstate": state_name(t.oldstate), "newstate": state_name(t.newstate),
        "ms": None if t.dur_ns is None else t.dur_ns / 1e6, "note": t.note or None,
    }
    if home:
        record.update(transition_home(lc.cgroup_id))
    return record


def lifecycle_record(lc: Lifecycle, clock: Clock, *, still_open: bool = False, health: dict | None = None) -> dict:
    """health: a still-open connection's health from the last look (lifecycle_extras)."""
    total = lc.duration_ns
    return {
        "type": "lifecycle", "conn_id": lc.conn_id, "role": lc.role, "family": lc.family,
        "laddr": lc.laddr, "lport": lc.lport or None, "raddr": lc.raddr, "rport": lc.rport or None,
        "netns": lc.netns, "uid": lc.uid, "pid": lc.owner_pid, "comm": lc.owner_comm,
        "owner_source": lc.owner_source, "listener_pid": lc.listener_pid,
        "birth_seen": lc.birth_seen, "start": clock.iso(lc.start_ns), "end": clock.iso(lc.end_ns),
        "ms": None if total is None else total / 1e6,
        "state_ms": {state_name(s): ns / 1e6 for s, ns in lc.state_ns.items()},
        "path": [state_name(s) for s in lc.path] + (["TIME_WAIT"] if lc.time_wait else []),
        "end_reason": "open" if still_open else lc.end_reason, "end_detail": lc.end_detail,
        "errno": errno_name(lc.errno), "time_wait": lc.time_wait, "tx_b": lc.tx_b, "rx_b": lc.rx_b,
        "eof_seen": clock.iso(lc.eof_ns), "incomplete": lc.incomplete or None,
        **lifecycle_extras(lc, health),
    }


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def summary_text(report: dict) -> str:
    """The exit summary (stderr). Losses are always printed, zeros included."""
    r = report
    lines = [
        f"tcplife-trace: {r['duration_s']:.1f} s traced, {r['connections_seen']} connections seen, "
        f"{r['closed']} closed, {r['still_open']} still open"
        + (f" (filters: {r['filters']})" if r["filters"] != "none" else ""),
    ]
    if r["end_reasons"]:
        lines.append("  ended: " + ", ".join(f"{k} {v}" for k, v in r["end_reasons"].items()))
    if r["state_times"]:
        lines.append("  %-12s %9s %10s %10s %10s %10s" % ("time in", "count", "p50 ms", "p90 ms",
                                                          "p99 ms", "max ms"))
        for row in r["state_times"]:
            lines.append("  %-12s %9d %10.3f %10.3f %10.3f %10.3f" % (
                row["state"], row["count"], row["p50_ms"], row["p90_ms"], row["p99_ms"], row["max_ms"]))
    by_kind = ", ".join(f"{k} {v}" for k, v in r["events_lost_by_kind"].items() if v)
    lines.append(
        ("  records (kernel aggregation: one per connection, listeners and strays as events): "
         if r.get("mode") == "aggregate" else "  events: ")
        + f"{r['events_received']} received of {r['events_emitted_by_kernel']} emitted; "
        f"lost {r['events_lost']}" + (f" ({by_kind})" if by_kind else "")
        + f"; connection map full {r['conn_map_full']}; evicted {r['evictions']}")
    if r.get("recursion_misses") is None and "recursion_misses" in r:
        lines.append("  recursion misses: not counted by this kernel (5.12+ counts them)")
    late = r.get("overflow_out_of_order", 0)
    reordered = r.get("transitions_out_of_order", 0)
    if r["sequence_gaps"] or r["unmatched_errors"] or late or reordered:
        lines.append(f"  inconsistencies: {r['sequence_gaps']} transitions out of sequence, "
                     f"{r['unmatched_errors']} errno reports without a connection"
                     + (f", {late} overflow events too late to be put in order" if late else "")
                     + (f", {reordered} transitions that arrived after a later one of their "
                        "connection" if reordered else ""))
    if r.get("sockets_at_start"):
        lines.append("  sockets at start (all namespaces): "
                     + ", ".join(f"{k} {v}" for k, v in r["sockets_at_start"].items()))
    if "findings" in r:
        resolved = sum(1 for f in r["findings"] if f.get("resolved_at"))
        lines.append(f"  findings: {len(r['findings'])}" + ("" if r["findings"] else " (healthy)")
                     + (f" ({resolved} resolved before the end)" if resolved else ""))
        for f in r["findings"]:
            when = f" (resolved at {f['resolved_at'][11:19]} UTC)" if f.get("resolved_at") else ""
            lines.append(f"    {f['severity'].upper()} {f['kind']}{when}: {f['summary']}")
    for e in r.get("snapshot_errors") or []:
        lines.append(f"  sockets not read: {e}")
    rec = r.get("recording")
    if rec:
        size = "" if rec["bytes"] is None else f", {rec['bytes'] / 2**20:.1f} MiB"
        lines.append(f"  recorded {rec['events']} event{'' if rec['events'] == 1 else 's'} and "
                     f"{rec['socket_snapshots']} socket snapshot{'' if rec['socket_snapshots'] == 1 else 's'} to "
                     f"{rec['path']}{size}; read it with: {invocation.command()} analyze {rec['path']}")
        if rec.get("failed"):
            lines.append(f"  RECORDING INCOMPLETE: {rec['failed']}")
    return "\n".join(lines)
