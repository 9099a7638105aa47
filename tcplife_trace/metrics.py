"""Prometheus metrics of a live session.

The hot path only bumps plain dict counters; a custom collector turns them into
metric families when Prometheus scrapes (so tracing pays no client-library cost per
event). Labels are bounded: states, roles, end reasons and finding kinds are closed
sets; per-port, per-command and per-container labels are opt-in and capped, the rest is "other".
"""
from __future__ import annotations

import bisect
import os
import socket
import sys
import threading
import time
from collections import Counter
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import __version__
from tcplife_trace.analysis.closes import group
from tcplife_trace.analysis.lifecycle import BIRTHS, Lifecycle, Transition
from tcplife_trace.analysis.rules import KERNEL_ROLES
from tcplife_trace.probes import decode as dec
from tcplife_trace.probes import health as health_mod
from tcplife_trace.probes.event_layout import EventKind, Flag, LifeFlag, XFlag
from tcplife_trace.probes.tcp_states import state_name

# time-in-state buckets, seconds: sub-millisecond handshakes up to TIME_WAIT-long and leaked states
BUCKETS_S = (0.0001, 0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 3600)
_BUCKETS_NS = [int(b * 1e9) for b in BUCKETS_S]
_BUCKETS_ARR = np.asarray(_BUCKETS_NS, dtype=np.int64)
_STATE, _X_DUR, _F_NETNS = int(EventKind.STATE), int(XFlag.DUR), int(Flag.NETNS)
_PASSIVE_BIRTH = next(pair for pair, role in BIRTHS.items() if role == "passive")  # an accepted socket's
_ROLE_ACTIVE = KERNEL_ROLES.index("active")  # struct tlt_event.role
POLL_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
# smoothed RTT at a connection's end, seconds: loopback and LAN up to a satellite link
RTT_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5)
_RTT_BUCKETS_MS = np.asarray([b * 1000 for b in RTT_BUCKETS_S])
_L_RETRANS = int(LifeFlag.RETRANS)
OPT_IN_LABELS = ("port", "comm", "container")
OTHER = "other"
NO_CONTAINER = "none"  # the container label of a connection whose owner is in none (or unknown)
CONTAINER_ID_LEN = 12  # the short form `docker ps` shows
_PID_HOMES_MAX = 4096  # owners' containers remembered by pid (for a birth before the cgroup id)


class CappedLabel:
    """Values of one opt-in label: the first `cap` distinct ones are kept, later ones are "other"."""

    def __init__(self, cap: int):
        self.cap = cap
        self.seen: set[str] = set()
        self.overflowed = 0

    def __call__(self, value) -> str:
        v = "" if value is None else str(value)
        if v in self.seen:
            return v
        if len(self.seen) < self.cap:
            self.seen.add(v)
            return v
        self.overflowed += 1
        return OTHER


class Metrics:
    def __init__(self, labels: tuple[str, ...] = (), label_cap: int = 50, resolver=None):
        unknown = set(labels) - set(OPT_IN_LABELS)
        if unknown:
            raise ValueError(f"unknown metric label {sorted(unknown)[0]!r}; choose from {', '.join(OPT_IN_LABELS)}")
        self.labels = tuple(label for label in OPT_IN_LABELS if label in labels)
        self.capped = {label: CappedLabel(label_cap) for label in self.labels}
        # the container label: the owner's cgroup (the kernel's id, else the owner's /proc) to a
        # container id (tcplife_trace/containers.py Resolver)
        self.resolver = resolver
        if "container" in self.labels and resolver is None:
            from .containers import Resolver
            self.resolver = Resolver()
        self._pid_homes: dict[tuple, str] = {}
        self.transitions: Counter[tuple[int, int]] = Counter()
        self.opened: Counter[tuple] = Counter()
        self.closed: Counter[tuple] = Counter()
        self.hist: dict[int, list] = {}   # state -> [bucket counts..., +Inf count, sum ns]
        # the kernel's fold at each end (issue 15): smoothed RTT read at CLOSE, by the opt-in
        # labels only -> [bucket counts..., +Inf count, sum ms]; retransmits sent, (kind, labels...)
        self.rtt_hist: dict[tuple, list] = {}
        self.retransmits: Counter[tuple] = Counter()
        self.session_report: dict = {}    # refreshed by the main loop (kernel counters)
        self.sockets: dict[str, int] = {}  # state -> sockets now, from the last sock_diag snapshot
        self.findings: Counter[tuple[str, str]] = Counter()
        # the endpoint's own sockets (its listener, the scrapes it accepts): not the host's traffic
        self._own_port = 0
        self._own_addr: str | None = None  # None: any local address
        self._own_netns: int | None = None
        self.own_connections = 0
        # transitions, opened and time in state counted by the kernel (count_in_kernel)
        self._kernel = None
        self._kernel_last = None
        self._kernel_own0 = 0
        self.session = None  # a LiveSession, for the tracer's own health (ring, map, consumer)
        self._consumer_tid: int | None = None
        self._poll_hist = [0] * (len(POLL_BUCKETS_S) + 2)  # sock_diag looks: buckets, +Inf, sum s

    # -- hot path (the tracer's callbacks) -----------------------------------------------
    def _extra(self, lc: Lifecycle) -> tuple:
        out = []
        for label in self.labels:
            if label == "port":
                port = lc.rport if lc.role == "active" else lc.lport
                out.append(self.capped["port"](port or None))
            elif label == "comm":
                out.append(self.capped["comm"](lc.owner_comm))
            else:
                out.append(self.capped["container"](self._container(lc)))
        return tuple(out)

    def _container(self, lc: Lifecycle) -> str:
        """The owner's container id, short; "none" when it is in none or is not known. From the
        cgroup id the kernel took with the owner (a lifecycle's fold), else (a birth followed
        from events, before the fold is joined) from the owner's /proc/PID/cgroup."""
        if lc.cgroup_id:
            cid = self.resolver.by_id(lc.cgroup_id).container_id
            return cid[:CONTAINER_ID_LEN] if cid else NO_CONTAINER
        if lc.owner_pid is None:
            return NO_CONTAINER
        key = (lc.owner_pid, lc.owner_comm)
        got = self._pid_homes.get(key)
        if got is None:
            home = self.resolver.by_pid(lc.owner_pid)
            cid = home.container_id if home is not None else None
            got = cid[:CONTAINER_ID_LEN] if cid else NO_CONTAINER
            if len(self._pid_homes) >= _PID_HOMES_MAX:
                self._pid_homes.clear()
            self._pid_homes[key] = got
        return got

    def _own(self, lc: Lifecycle) -> bool:
        return (lc.role != "active" and lc.lport == self._own_port and lc.netns in (None, self._own_netns)
                and (self._own_addr is None or lc.laddr == self._own_addr))

    def on_transition(self, t: Transition) -> None:
        if self._own_port and t.lc.lport == self._own_port and self._own(t.lc):
            if (t.oldstate, t.newstate) in BIRTHS and t.lc.role == "passive":
                self.own_connections += 1
            return
        self.transitions[(t.oldstate, t.newstate)] += 1
        if t.dur_ns is not None:
            h = self.hist.get(t.oldstate)
            if h is None:
                h = self.hist[t.oldstate] = [0] * (len(_BUCKETS_NS) + 2)
            h[bisect.bisect_left(_BUCKETS_NS, t.dur_ns)] += 1
            h[-1] += t.dur_ns
        if (t.oldstate, t.newstate) in BIRTHS:
            self.opened[(t.lc.role, *self._extra(t.lc)) if self.labels else (t.lc.role,)] += 1

    def on_batch(self, events: np.ndarray) -> None:
        """One batch's events (EVENT_DTYPE columns) counted as on_transition counts them one
        Transition at a time: transitions by (old, new), time in the old state from the
        kernel's fold (dur_ns), connections opened by role; the endpoint's own accepted
        sockets left out. For sessions without opt-in labels and without user-space filters
        (the tracker passes every transition then), so the hot path holds no Python object
        per event."""
        if self.labels:
            raise ValueError("opt-in labels (port, comm, container) need the lifecycles: use on_transition")
        if self._kernel is not None:  # the kernel counts them (count_in_kernel)
            return
        ev = events[events["kind"] == _STATE]
        if not len(ev):
            return
        old, new = ev["oldstate"].astype(np.int64), ev["newstate"].astype(np.int64)
        if self._own_port:
            own = self._own_rows(ev)
            if own.any():
                births = (old[own] == _PASSIVE_BIRTH[0]) & (new[own] == _PASSIVE_BIRTH[1])
                self.own_connections += int(births.sum())
                keep = ~own
                ev, old, new = ev[keep], old[keep], new[keep]
        pairs, counts = np.unique(old * 16 + new, return_counts=True)
        for pair, n in zip(pairs.tolist(), counts.tolist()):
            o, nw = divmod(pair, 16)
            self.transitions[(o, nw)] += n
            role = BIRTHS.get((o, nw))
            if role is not None:
                self.opened[(role,)] += n
        timed = (ev["xflags"] & _X_DUR) != 0
        if timed.any():
            dur, state = ev["dur_ns"][timed].astype(np.int64), old[timed]
            where = np.searchsorted(_BUCKETS_ARR, dur, side="left")  # bisect_left
            for st in np.unique(state).tolist():
                sel = state == st
                h = self.hist.get(st)
                if h is None:
                    h = self.hist[st] = [0] * (len(_BUCKETS_NS) + 2)
                add = np.bincount(where[sel], minlength=len(_BUCKETS_NS) + 1)
                for i, n in enumerate(add.tolist()):
                    h[i] += n
                h[-1] += int(dur[sel].sum())

    def _own_rows(self, ev: np.ndarray) -> np.ndarray:
        """Rows of the endpoint's own accepted sockets (see _own): not active, its local port,
        its namespace (or none known), its address if it is bound to one."""
        own = (ev["sport"] == self._own_port) & (ev["role"] != _ROLE_ACTIVE)
        known = (ev["flags"] & _F_NETNS) != 0  # (_own: netns None or ours; ours unknown: None only)
        own &= ~known | ((ev["netns"] == self._own_netns) if self._own_netns is not None else False)
        if self._own_addr is not None and own.any():
            for i in np.flatnonzero(own).tolist():
                if dec.addr(int(ev["family"][i]), ev["saddr"][i].tobytes()) != self._own_addr:
                    own[i] = False
        return own

    def on_close(self, lc: Lifecycle) -> None:
        if self._own_port and lc.lport == self._own_port and self._own(lc):
            return
        extra = self._extra(lc) if self.labels else ()
        self.closed[(lc.role, lc.end_reason, *extra)] += 1
        if lc.retrans is not None:  # counted where tcp:tcp_retransmit_skb was traced
            if lc.retrans:
                self.retransmits[("data", *extra)] += lc.retrans
            if lc.syn_retrans:
                self.retransmits[("syn", *extra)] += lc.syn_retrans
        if lc.health_raw is not None:
            rtt = health_mod.from_fold(lc.health_raw).get("rtt_ms")
            if rtt is not None:
                self._rtt(extra, np.asarray([rtt], dtype=np.float64))

    def _rtt(self, key: tuple, rtt_ms: np.ndarray) -> None:
        h = self.rtt_hist.get(key)
        if h is None:
            h = self.rtt_hist[key] = [0] * (len(RTT_BUCKETS_S) + 2)
        add = np.bincount(np.searchsorted(_RTT_BUCKETS_MS, rtt_ms, side="left"), minlength=len(RTT_BUCKETS_S) + 1)
        for i, n in enumerate(add.tolist()):
            h[i] += n
        h[-1] += float(rtt_ms.sum())

    def closed_columns(self, rows) -> None:
        """on_close for the connections of one release as columns (analysis/closes.ClosedRows),
        row for row the same counts; only without labels (Session registers it so)."""
        # the endpoint's own by the rule its events go by (_own_rows): a LIFE record's event
        # part is the connection's last event, with the fold's role
        keep = ~self._own_rows(rows.lives["ev"]) if self._own_port else np.ones(rows.n, dtype=bool)
        for (role, reason), n, _ in group([rows.role, rows.end_reason], keep):
            self.closed[(role, reason)] += n
        agg = rows.lives["agg"]
        counted = keep & ((agg["lflags"] & _L_RETRANS) != 0)
        for kind, field in (("data", "retrans"), ("syn", "syn_retrans")):
            n = int(agg[field][counted].sum())
            if n:
                self.retransmits[(kind,)] += n
        if "rtt_ms" in health_mod.COLUMNS and keep.any():
            rtt, ok = health_mod.fold_columns(agg["health_mask"][keep], agg["health"][keep])["rtt_ms"]
            if ok.any():
                self._rtt((), np.asarray(rtt, dtype=np.float64)[ok])

    def count_in_kernel(self, live) -> None:
        """Take transitions, connections opened and the time in each state from the kernel's
        own counts (probes/transition_counts.py, read from `live`, a LiveSession, at each
        scrape) instead of counting events: nothing per event in user space, and no hole where
        events were lost. For sessions without opt-in labels and without user-space filters
        (Session decides so); the endpoint's own connections are left out by the kernel."""
        if self.labels:
            raise ValueError("opt-in labels (port, comm, container) need the lifecycles: use on_transition")
        self._kernel = live
        self._kernel_last = live.transition_counts()
        self._kernel_own0 = self._kernel_last.self_births  # the start-up check's, before this endpoint

    def _counted(self):
        """(transitions, opened, hist, own connections): the kernel's counts (count_in_kernel)
        or the ones counted here."""
        if self._kernel is None:
            return self.transitions, self.opened, self.hist, self.own_connections
        try:
            self._kernel_last = self._kernel.transition_counts()
        except Exception:  # noqa: BLE001 - bcc raises Exception: stopping now, the last read stands
            pass
        c = self._kernel_last
        opened: Counter = Counter()
        for pair, n in c.transitions.items():
            role = BIRTHS.get(pair)
            if role is not None:
                opened[(role,)] += n
        return c.transitions, opened, c.hist, c.self_births - self._kernel_own0

    # -- slow path (main loop, about once a second) --------------------------------------
    def attach(self, session, port: int | None = None, addr: str | None = None) -> None:
        """Follow `session`'s health, from the thread that polls it (the consumer); leave the
        connections of an endpoint on `port` (bound to `addr`) out of the counters."""
        self.session = session
        self._consumer_tid = threading.get_native_id()
        if port:
            self._own_port = port
            from tcplife_trace.probes import transition_counts
            if session is not None:  # the kernel's counts leave it out too
                transition_counts.own_port(session.program, port)
            self._own_addr = None if addr in (None, "", "0.0.0.0", "::") else socket.getaddrinfo(
                addr, port, type=socket.SOCK_STREAM)[0][4][0]
            try:
                self._own_netns = os.stat("/proc/self/ns/net").st_ino
            except OSError:
                self._own_netns = None

    def on_socket_poll(self, seconds: float) -> None:
        """One sock_diag look took this long (the consumer waited for it)."""
        h = self._poll_hist
        h[bisect.bisect_left(POLL_BUCKETS_S, seconds)] += 1
        h[-1] += seconds

    def update(self, report: dict, snapshot_counts: dict[str, int] | None = None, findings=None) -> None:
        self.session_report = report
        if snapshot_counts is not None:
            self.sockets = dict(snapshot_counts)
        if findings is not None:
            self.findings = Counter((f.kind, f.severity) for f in findings)

    # -- scrape --------------------------------------------------------------------------
    def collect(self):
        yield _gauge("tcplife_build_info", "Version of tcplife-trace and the kernel traced.",
                     {("version", "kernel"): {(__version__, os.uname().release): 1}})
        c = CounterMetricFamily("tcplife_transitions", "TCP state transitions seen.",
                                labels=["old_state", "new_state"])
        transitions, opened, hist, own = self._counted()
        for (old, new), n in sorted(transitions.items()):
            c.add_metric([state_name(old), state_name(new)], n)
        yield c
        extra = list(self.labels)
        c = CounterMetricFamily("tcplife_connections_opened", "Connections born during the trace, by role.",
                                labels=["role", *extra])
        for key, n in sorted(opened.items()):
            c.add_metric([str(k) for k in key], n)
        yield c
        c = CounterMetricFamily("tcplife_connections_closed", "Connections that ended, by role and how.",
                                labels=["role", "end_reason", *extra])
        for key, n in sorted(self.closed.items()):
            c.add_metric([str(k) for k in key], n)
        yield c
        h = HistogramMetricFamily("tcplife_state_duration_seconds", "Time connections spent in each state.",
                                  labels=["state"])
        for state, counts in sorted(hist.items()):
            h.add_metric([state_name(state)], _cumulative(BUCKETS_S, counts), counts[-1] / 1e9)
        yield h
        h = HistogramMetricFamily("tcplife_rtt_at_close_seconds", "Smoothed RTT of each connection at its "
                                  "end, read in the kernel at CLOSE (where this kernel's BTF has it).",
                                  labels=extra)
        for key, counts in sorted(self.rtt_hist.items()):
            h.add_metric([str(k) for k in key], _cumulative(RTT_BUCKETS_S, counts), counts[-1] / 1e3)
        yield h
        c = CounterMetricFamily("tcplife_retransmits", "Segments retransmitted by connections that ended "
                                "(tcp:tcp_retransmit_skb): kind data, or syn (SYN retries in SYN_SENT).",
                                labels=["kind", *extra])
        for key, n in sorted(self.retransmits.items()):
            c.add_metric([str(k) for k in key], n)
        yield c
        g = GaugeMetricFamily("tcplife_sockets", "TCP sockets per state now, all network namespaces "
                              "(sock_diag; includes TIME_WAIT and half-open SYN_RECV).", labels=["state"])
        for state, n in sorted(self.sockets.items()):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("tcplife_leak_findings", "Current leak and pile findings.",
                              labels=["kind", "severity"])
        for (kind, sev), n in sorted(self.findings.items()):
            g.add_metric([kind, sev], n)
        yield g
        r = self.session_report
        yield _counter("tcplife_events_received", "Events that reached user space.", r.get("events_received", 0))
        c = CounterMetricFamily("tcplife_events_lost", "Events lost before user space, by kind: an event kind "
                                "both buffers refused, recursion:<tracepoint> (hits skipped while another BPF "
                                "program ran on the CPU), ring_discarded.", labels=["kind"])
        for kind, n in sorted(r.get("events_lost_by_kind", {}).items()):
            c.add_metric([kind], n)
        yield c
        yield _counter("tcplife_evictions", "Open connections dropped at the table cap.", r.get("evictions", 0))
        yield _counter("tcplife_conn_map_full", "Sockets the kernel connection map had no room for.",
                       r.get("conn_map_full", 0))
        yield _counter("tcplife_label_overflow", "Label values folded into \"other\" by the cap.",
                       sum(cl.overflowed for cl in self.capped.values()))
        yield from self._health(own)

    def _health(self, own_connections: int):
        """The tracer's own health, read when scraped."""
        yield _counter("tcplife_metrics_connections", "Connections to this metrics endpoint (left out of "
                       "the connection counters).", own_connections)
        h = HistogramMetricFamily("tcplife_socket_poll_duration_seconds", "How long each sock_diag look at "
                                  "every socket held the consumer up.")
        h.add_metric([], _cumulative(POLL_BUCKETS_S, self._poll_hist), self._poll_hist[-1])
        yield h
        ports = _ephemeral_ports()
        if ports is not None:
            yield _gauge1("tcplife_ephemeral_ports", "Size of net.ipv4.ip_local_port_range of the tracer's "
                          "namespace: the ports one destination's outgoing connections can use.", ports)
        cpu = _thread_cpu_s(self._consumer_tid) if self._consumer_tid else None
        if cpu is not None:
            yield _counter("tcplife_consumer_cpu_seconds", "CPU time of the consumer thread (reads the ring, "
                           "follows the connections), user and system.", cpu)
        s = self.session
        if s is None or s.report is not None:  # not attached, or stopped: the kernel side is gone
            return
        st = s.stream
        yield _gauge1("tcplife_ring_buffer_size_bytes", "Size of the BPF ring buffers (the events' and the "
                      "folded records'), added.", st.reader.data_size + st.lives_reader.data_size)
        yield _gauge1("tcplife_ring_buffer_peak_fill_ratio", "Largest share of either ring buffer seen waiting "
                      "since the start (1: full, records are then lost).", st.peak_fill)
        yield _gauge1("tcplife_tracked_connections", "Connections the consumer holds itself now: all open "
                      "ones when it follows every transition; listeners, map-full strays and endings "
                      "waiting for their errno when the kernel folds the rest (tcplife_conn_map_entries).",
                      len(s.tracker.live))
        yield _gauge1("tcplife_conn_map_capacity", "Entries the kernel connection map can hold (--max-conns).",
                      s.settings.max_conns)
        from tcplife_trace.probes.map_count import count_entries
        try:
            n = count_entries(s.program.bpf[b"conns"])
        except Exception:  # noqa: BLE001 - bcc raises Exception; the map may be closing
            n = None
        if n is not None:
            yield _gauge1("tcplife_conn_map_entries", "Entries in the kernel connection map now.", n)


def _ephemeral_ports() -> int | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        return None
    return hi - lo + 1


def _thread_cpu_s(tid: int) -> float | None:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _gauge1(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _cumulative(bounds, counts: list) -> list[tuple[str, int]]:
    """A histogram's [per-bucket counts..., +Inf count, sum] as Prometheus' cumulative buckets."""
    cum, out = 0, []
    for bound, n in zip(bounds, counts[:-2]):
        cum += n
        out.append((_fmt(bound), cum))
    out.append(("+Inf", cum + counts[-2]))
    return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, by_labels: dict) -> GaugeMetricFamily:
    (names, values), = by_labels.items()
    g = GaugeMetricFamily(name, doc, labels=list(names))
    for labels, v in values.items():
        g.add_metric(list(labels), v)
    return g


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - no line per request in the journal
        pass


class ClientErrors:
    """What a scraper did wrong (went away mid-response, sent garbage): one line on stderr, at
    most one per `every_s`, with the count of those folded into it. A long-running agent's
    journal must not fill with tracebacks of clients' mistakes."""

    def __init__(self, every_s: float = 60.0, out=None):
        self.every_s = every_s
        self.out = out
        self.total = 0
        self._since = 0  # errors not yet said
        self._last = -every_s
        self._lock = threading.Lock()

    def __call__(self, client, exc: BaseException | None) -> None:
        with self._lock:
            self.total += 1
            self._since += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            n, self._since, self._last = self._since, 0, now
        what = type(exc).__name__ if exc is not None else "error"
        detail = str(exc).splitlines()[0][:80] if exc is not None and str(exc) else ""
        peer = f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) >= 2 else str(client)
        more = f"; {n - 1} more client errors since the last such line" if n > 1 else ""
        print(f"tcplife-trace: notice: metrics client {peer}: {what}{': ' + detail if detail else ''} "
              f"(request dropped; at most one such line a minute){more}", file=self.out or sys.stderr, flush=True)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold the exit up
    client_errors: ClientErrors

    def handle_error(self, request, client_address):
        self.client_errors(client_address, sys.exc_info()[1])


def serve(metrics: Metrics, port: int, addr: str = "127.0.0.1", client_errors: ClientErrors | None = None):
    """Start the /metrics endpoint in a background thread; returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    # process_* (CPU, memory, fds, start time) and python_* as every client library exports them
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family,
                                                       "client_errors": client_errors or ClientErrors()})
    server = make_server(sockaddr[0], port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="tcplife-metrics", daemon=True).start()
    return server
