"""The counters behind `tcplife-trace top`, fed from a live session's transitions and closes.

The consumer thread feeds a TopModel (`transition`, `closed`, `sockets`, `findings`) and, once
a second, builds a TopSnapshot from it; the screen thread only ever reads the latest snapshot
(one attribute read, no lock), so a slow screen never holds the consumer up. Everything here
is plain Python and testable without a screen or a kernel:

    m = TopModel()
    m.transition(t); m.closed(lc)
    snap = m.snapshot(open_lifecycles, status)
    snap.rows("peer", view_filter, sort="churn")
"""
from __future__ import annotations

import shlex
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from tcplife_trace.analysis.lifecycle import BIRTHS, Lifecycle, Transition
from tcplife_trace.probes.filters import Filters

WINDOW_S = 10          # churn/s and the per-second rates are over the last WINDOW_S seconds
TREND_POINTS = 120     # points kept for the trend lines (one per snapshot: two minutes at 1/s)
MAX_KEYS = 20_000      # distinct connection keys kept; beyond, counted under OTHER_KEY
OTHER_KEY = (0, None, "(other)", 0, "(other)", 0)
RESETS = ("reset_by_peer", "local_abort")
GROUPS = ("peer", "port", "process")   # the three tables of the screen
ALL_GROUPS = GROUPS + ("container",)   # `g` also shows the owners' cgroups (containers, pods, units)
SORTS = ("churn", "open", "new", "resets", "refused", "timeouts")
_NEW = {b for b, role in BIRTHS.items() if role != "listener"}


def conn_key(lc: Lifecycle) -> tuple:
    """(family, pid, comm, lport, raddr, rport) with the ephemeral side's port as 0: the service
    port is kept (a client's remote port, a server's local port), so that a minute of churn is a
    few keys, not one per connection."""
    lport = 0 if lc.role == "active" else (lc.lport or 0)
    rport = 0 if lc.role == "passive" else (lc.rport or 0)
    return (lc.family or 0, lc.owner_pid, lc.owner_comm or "-", lport, lc.raddr or "-", rport)


def home_name(home) -> str:
    """A containers.Home as one name: the pod, else the container, else the systemd unit, else
    the cgroup path ("/": the host's root cgroup)."""
    if home is None:
        return "(gone)"
    if home.pod_name:
        return f"pod {home.pod_namespace}/{home.pod_name}"
    if home.container_id:
        return f"{home.runtime or 'container'} {home.container_id[:12]}"
    return home.unit or home.path or "(unknown)"


def group_of(key: tuple, group: str, homes: dict | None = None) -> str:
    family, pid, comm, lport, raddr, rport = key
    if group == "container":
        return (homes or {}).get(key, "(unknown)")
    if group == "peer":
        return f"{raddr}:{rport}" if rport else str(raddr)
    if group == "port":
        return str(lport) if lport else "(client)"
    return f"{comm} {pid}" if pid is not None else comm


def parse_filter(text: str) -> Filters:
    """The filter box: the command line's -p -L -D -4 -6 (e.g. `-L 8080 -4`); ValueError with
    one line saying what is wrong otherwise."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot read the filter: {e}") from None
    pids, lports, rports, family = [], [], [], None
    names = {"-p": pids, "--pid": pids, "-L": lports, "--localport": lports, "-D": rports, "--remoteport": rports}
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-4", "--ipv4", "-6", "--ipv6"):
            f = 4 if "4" in w else 6
            if family not in (None, f):
                raise ValueError("-4 and -6 exclude each other")
            family, i = f, i + 1
            continue
        if w not in names:
            raise ValueError(f"unknown filter {w!r}: use -p PID -L PORT -D PORT -4 -6")
        if i + 1 >= len(words):
            raise ValueError(f"{w} needs a value, e.g. {w} 8080")
        hi = 2**22 if w in ("-p", "--pid") else 65535
        for part in words[i + 1].split(","):
            if not part.isdigit() or not 1 <= int(part) <= hi:
                raise ValueError(f"{part!r} is not a {'pid' if hi > 65535 else 'port'} (1-{hi})")
            names[w].append(int(part))
        i += 2
    return Filters(pids=tuple(pids), lports=tuple(lports), rports=tuple(rports), family=family)


def key_matches(key: tuple, f: Filters | None) -> bool:
    """A connection key kept by the filter box (the same rule as the kernel's filters; a key
    has no ephemeral port, so -L/-D match service ports)."""
    if f is None or not f.active():
        return True
    family, pid, _comm, lport, _raddr, rport = key
    return f.match(family=family or None, lport=lport or None, rport=rport or None, role="",
                   owner_pids=(pid,) if pid is not None else ())


@dataclass
class Row:
    name: str
    new: int = 0
    closed: int = 0
    open: int = 0
    resets: int = 0
    refused: int = 0
    timeouts: int = 0
    churn: float = 0.0  # connections ended per second over the window

    def add(self, k: dict) -> None:
        for f in ("new", "closed", "open", "resets", "refused", "timeouts", "churn"):
            setattr(self, f, getattr(self, f) + k.get(f, 0))


@dataclass
class TopSnapshot:
    """What the screen shows, taken at one moment (never changed afterwards)."""
    taken: float                                  # time.time()
    elapsed_s: float
    per_key: dict[tuple, dict]                    # conn_key -> new, closed, open, resets, refused, timeouts, churn
    new_per_s: float
    closed_per_s: dict[str, float]                # end reason -> per second over the window
    totals: dict[str, int]                        # new, closed, open, resets, refused, timeouts
    sockets: dict[str, int]                       # sockets per state, every namespace (the last look)
    sockets_trend: dict[str, list[int]]           # state -> counts of the recent looks
    rate_trend: list[float]                       # new connections/s, one point per snapshot
    state_times: list[dict]                       # StateTimes.table()
    findings: list                                # analysis.leaks.Finding of the last look
    status: dict = field(default_factory=dict)    # events_per_s, lost, map_fill, ring_fill, ring_peak, cpu_pct
    messages: list[str] = field(default_factory=list)
    homes: dict[tuple, str] = field(default_factory=dict)  # conn_key -> its owner's cgroup, as home_name says
    said: int = 0                                 # messages said since the start (the last are in messages)

    def rows(self, group: str, view: Filters | None = None, sort: str = "churn", limit: int | None = None) -> list[Row]:
        out: dict[str, Row] = {}
        for key, k in self.per_key.items():
            if not key_matches(key, view):
                continue
            name = group_of(key, group, self.homes)
            row = out.get(name)
            if row is None:
                row = out[name] = Row(name)
            row.add(k)
        rows = sorted(out.values(), key=lambda r: (-getattr(r, sort), -r.closed, r.name))
        return rows[:limit] if limit is not None else rows

    def filtered_totals(self, view: Filters | None) -> dict[str, int]:
        if view is None or not view.active():
            return dict(self.totals)
        t = Counter()
        for key, k in self.per_key.items():
            if key_matches(key, view):
                t.update({f: k.get(f, 0) for f in ("new", "closed", "open", "resets", "refused", "timeouts")})
        return {f: t.get(f, 0) for f in ("new", "closed", "open", "resets", "refused", "timeouts")}


class TopModel:
    """Counters by connection key, fed by the consumer thread only."""

    def __init__(self, window_s: int = WINDOW_S, clock=time.monotonic, home_of=None):
        self.window_s = window_s
        # pid -> the name of its cgroup (home_name of containers.Resolver.by_pid), asked once per key
        self.home_of = home_of
        self.homes: dict[tuple, str] = {}
        self.clock = clock
        self.started = clock()
        self.keys: dict[tuple, Counter] = {}
        self._counted: dict = {}                   # conn_id -> key, of connections counted as new
        self.new_total = 0
        self.ended = Counter()                     # end reason -> count
        self._slots: deque = deque()               # (second, new, Counter(reason), Counter(key)) per second
        self.sockets: dict[str, int] = {}
        self.sockets_trend: dict[str, deque] = {}
        self._looks = 0
        self.rate_trend: deque = deque(maxlen=TREND_POINTS)
        self.findings: list = []
        self.messages: deque = deque(maxlen=5)
        self.said = 0                              # messages said so far (the plain print says each once)

    def _slot(self):
        sec = int(self.clock())
        if not self._slots or self._slots[-1][0] != sec:
            self._slots.append([sec, 0, Counter(), Counter()])
            while self._slots[0][0] <= sec - self.window_s:
                self._slots.popleft()
        return self._slots[-1]

    def _key(self, lc: Lifecycle) -> tuple:
        key = conn_key(lc)
        if key not in self.keys:
            if len(self.keys) >= MAX_KEYS:
                key = OTHER_KEY
            self.keys.setdefault(key, Counter())
            if key not in self.homes:
                self.homes[key] = "-" if key[1] is None or self.home_of is None else self.home_of(key[1])
        return key

    # -- inputs (consumer thread) --------------------------------------------------------------
    def transition(self, t: Transition) -> None:
        """A new connection is a birth (CLOSE -> SYN_SENT, LISTEN -> SYN_RECV), counted once."""
        if (t.oldstate, t.newstate) in _NEW and t.lc.conn_id not in self._counted:
            key = self._key(t.lc)
            self._counted[t.lc.conn_id] = key
            self.keys[key]["new"] += 1
            self.new_total += 1
            self._slot()[1] += 1

    def closed(self, lc: Lifecycle) -> None:
        if lc.role == "listener":
            return
        # the key of its birth (its owner may be known better now: keep the counts together)
        key = self._counted.pop(lc.conn_id, None) or self._key(lc)
        reason = lc.end_reason or "unknown"
        c = self.keys.setdefault(key, Counter())
        c["closed"] += 1
        if reason in RESETS:
            c["resets"] += 1
        elif reason == "refused":
            c["refused"] += 1
        elif reason == "timeout":
            c["timeouts"] += 1
        self.ended[reason] += 1
        slot = self._slot()
        slot[2][reason] += 1
        slot[3][key] += 1

    def sockets_seen(self, counts: dict[str, int]) -> None:
        """Sockets per state of a look at every namespace (diagnosis.Watch.latest_counts)."""
        self._looks += 1
        self.sockets = dict(counts)
        for state in set(counts) | set(self.sockets_trend):
            trend = self.sockets_trend.get(state)
            if trend is None:  # a state first seen now was 0 at every earlier look
                trend = self.sockets_trend[state] = deque([0] * (self._looks - 1), maxlen=TREND_POINTS)
            trend.append(counts.get(state, 0))

    def findings_seen(self, findings: list) -> None:
        self.findings = list(findings)

    def say(self, message: str) -> None:
        self.messages.append(message)
        self.said += 1

    # -- output (consumer thread, once a second) -----------------------------------------------
    def snapshot(self, open_lifecycles: list[Lifecycle] = (), status: dict | None = None,
                 state_times: list[dict] | None = None) -> TopSnapshot:
        now = self.clock()
        self._slot()  # drops the slots that left the window
        span = max(1.0, min(self.window_s, now - self.started))
        new_w = sum(s[1] for s in self._slots)
        reasons, by_key = Counter(), Counter()
        for s in self._slots:
            reasons.update(s[2])
            by_key.update(s[3])
        if len(self._counted) > 2 * len(open_lifecycles) + 10_000:
            # births whose close never came (evicted by the tracker): only the open ones can still close
            still = {lc.conn_id for lc in open_lifecycles}
            self._counted = {cid: k for cid, k in self._counted.items() if cid in still}
        per_key = {k: dict(c) for k, c in self.keys.items()}
        opened = Counter()
        for lc in open_lifecycles:
            if lc.role != "listener":
                opened[self._key(lc)] += 1
        for k, n in opened.items():
            per_key.setdefault(k, {})["open"] = n
        for k, n in by_key.items():
            per_key.setdefault(k, {})["churn"] = n / span
        totals = {"new": self.new_total, "closed": sum(self.ended.values()), "open": sum(opened.values()),
                  "resets": sum(self.ended[r] for r in RESETS), "refused": self.ended["refused"],
                  "timeouts": self.ended["timeout"]}
        self.rate_trend.append(new_w / span)
        return TopSnapshot(
            taken=time.time(), elapsed_s=now - self.started, per_key=per_key, new_per_s=new_w / span,
            closed_per_s={r: n / span for r, n in reasons.most_common()}, totals=totals,
            sockets=dict(self.sockets), sockets_trend={s: list(t) for s, t in self.sockets_trend.items()},
            rate_trend=list(self.rate_trend), state_times=list(state_times or []), findings=list(self.findings),
            status=dict(status or {}), messages=list(self.messages), said=self.said,
            homes=dict(self.homes))
