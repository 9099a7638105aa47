"""Connections that ended, a batch at a time: the kernel's LIFE records as columns.

The kernel folds every connection and sends one LIFE record (struct tlt_life) when it ends.
The Tracker (analysis/lifecycle.py) turns each record into a Lifecycle object: one Python
object per connection. When nobody wants those objects (no on_close callback, no user-space
filter), `FoldedCloses` counts what the session reports from the records' columns instead:
the end reasons (analysis/end_rules.py, the one rule, through classify_columns), the time in
each state, the counters, and the close watchers that take columns (`ClosedRows`).

It is the Tracker's rules, not a copy of them: a record the Tracker must see is handed to it
as its tuple and the Tracker does what it always did. Those are
- a record followed by an event of its connection (the kernel sends the errno report, a
  reset or a read after the CLOSE as events: `Tracker._error` and the others apply them to
  the closed lifecycle for DEFAULT_HOLD_NS), found by generation, or by ports for an errno
  report without one;
- a record whose start came as events (born while the connection map was full);
- an accepted socket whose listener the kernel's listener table did not have and the
  Tracker does (the Tracker names its owner from it).
The others wait DEFAULT_HOLD_NS as the Tracker's pending lifecycles do, then are counted.
tests/test_batch_path.py holds the two equal, field by field, on a real workload.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from tcplife_trace.probes import decode as dec
from tcplife_trace.probes.decode import life_tuples
from tcplife_trace.probes.event_layout import PATH_MAX, SRC_NONE, EventKind, Flag, LifeFlag
from tcplife_trace.probes.stream import Batch, _cat, _split, _take
from tcplife_trace.probes.unique_rows import unique_rows
from tcplife_trace.probes.tcp_states import TcpState as S
from . import end_rules
from .rules import BIRTHS, ROLES, guess_role, time_wait_from

_AGG, _BIRTH_UNSEEN, _NETNS = int(Flag.AGG), int(Flag.BIRTH_UNSEEN), int(Flag.NETNS)
_RST_RECEIVED, _RST_SENT, _DESTROYED, _LISTENER = (int(LifeFlag.RST_RECEIVED), int(LifeFlag.RST_SENT),
                                                  int(LifeFlag.DESTROYED), int(LifeFlag.LISTENER))
_ERROR, _STATE = int(EventKind.ERROR), int(EventKind.STATE)
_CLOSE, _LISTEN, _SYN_SENT = int(S.CLOSE), int(S.LISTEN), int(S.SYN_SENT)
NONE = np.iinfo(np.int64).min  # the code of a None value in a ClosedRows column
COUNT_EVERY_NS = 100_000_000  # the held records are counted this often (and at the end)
_ACTIVE_CLOSE = end_rules.REASON_OF_RULE.index("active_close")
REASONS = list(dict.fromkeys(end_rules.REASON_OF_RULE))  # each end reason once (rules share some)
_REASON_CODE = np.array([REASONS.index(r) for r in end_rules.REASON_OF_RULE], dtype=np.int64)


def _shape(path: tuple, unseen: bool) -> tuple[str, int]:
    """(role, state left for CLOSE or 0) of a folded connection, as Tracker.from_fold and
    Tracker._finish make them."""
    birth = BIRTHS.get((path[0], path[1])) if len(path) >= 2 else None
    if birth is not None and not unseen:
        role = birth
    else:
        role = "unknown"
        for old, new in zip(path, path[1:]):
            if role != "unknown":
                break
            role = guess_role(old, new, role)
    if role == "unknown" and path:
        role = guess_role(path[0], path[1] if len(path) > 1 else path[0], "unknown")
    before = path[-2] if len(path) >= 2 and path[-1] == _CLOSE else 0
    return role, before


_SHAPES: dict[bytes, tuple[int, int]] = {}  # path bytes + unseen flag -> (role index, before)
_ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}


def shapes(lives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(role index into rules.ROLES, state left for CLOSE or 0) of each LIFE row, from its path
    (a busy host has a handful of path shapes and millions of connections)."""
    n = len(lives)
    agg = lives["agg"]
    plen = agg["path_len"].astype(np.int64)
    path = np.ascontiguousarray(agg["path"]).reshape(n, PATH_MAX)
    # the path a Lifecycle gets: its first path_len states (all PATH_MAX when longer)
    keep = np.minimum(plen, PATH_MAX)
    path = np.where(np.arange(PATH_MAX) < keep[:, None], path, 0).astype(np.uint8)
    unseen = ((lives["ev"]["flags"] & _BIRTH_UNSEEN) != 0).astype(np.uint8)
    key = np.ascontiguousarray(np.concatenate([path, keep.astype(np.uint8)[:, None], unseen[:, None]], axis=1))
    first, inverse = unique_rows(key)
    role = np.empty(len(first), dtype=np.int8)
    before = np.empty(len(first), dtype=np.int64)
    for i, k in enumerate(key[first]):
        b = k.tobytes()
        hit = _SHAPES.get(b)
        if hit is None:
            r, bf = _shape(tuple(b[:b[PATH_MAX]]), bool(b[PATH_MAX + 1]))
            hit = _SHAPES[b] = (_ROLE_INDEX[r], bf)
            if len(_SHAPES) > 4096:
                _SHAPES.clear()
        role[i], before[i] = hit
    return role[inverse], before[inverse]


class Col:
    """One column of ClosedRows as integer codes: values[code] (values None: the code is the
    value itself), NONE for None."""
    __slots__ = ("codes", "values")

    def __init__(self, codes: np.ndarray, values: list | None = None):
        self.codes = codes
        self.values = values

    def decode(self, code: int):
        if code == NONE:
            return None
        return code if self.values is None else self.values[code]

    def unless(self, mask: np.ndarray) -> "Col":
        """The same column with None where mask holds."""
        return Col(np.where(mask, NONE, self.codes), self.values)

    def choose(self, mask: np.ndarray, other: "Col") -> "Col":
        """This column where mask holds, `other` (of the same code space) elsewhere."""
        return Col(np.where(mask, self.codes, other.codes), self.values)


def group(cols: list[Col], mask: np.ndarray) -> list[tuple[tuple, int, int]]:
    """(values, rows, the last row) of each distinct combination of cols among the rows in mask."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    m = np.ascontiguousarray(np.stack([c.codes[idx] for c in cols], axis=1)[::-1])
    first, inverse = unique_rows(m)
    counts = np.bincount(inverse, minlength=len(first))
    last = idx[len(idx) - 1 - first]
    return [(tuple(c.decode(v) for c, v in zip(cols, row)), int(k), int(at))
            for row, k, at in zip(m[first].tolist(), counts.tolist(), last.tolist())]


class ClosedRows:
    """The connections one release finished, as columns, with the values a Lifecycle would
    hold (Tracker.from_fold): role, end_reason, time_wait, netns, family, laddr, raddr, lport,
    rport, owner_pid, owner_comm, end_ns. Strings are made once per distinct value."""

    def __init__(self, lives: np.ndarray, role: np.ndarray, rule: np.ndarray, time_wait: np.ndarray):
        self.lives = lives
        self.n = len(lives)
        ev, agg = lives["ev"], lives["agg"]
        self.role = Col(role.astype(np.int64), list(ROLES))
        self.end_reason = Col(_REASON_CODE[rule], REASONS)
        self.time_wait = time_wait
        self.end_ns = ev["ts_ns"].astype(np.int64)
        self.netns = Col(np.where(ev["flags"] & _NETNS != 0, ev["netns"].astype(np.int64), NONE))
        owned = agg["owner_src"] < SRC_NONE
        self.owner_pid = Col(np.where(owned, agg["owner_pid"].astype(np.int64), NONE))
        comms, ci = np.unique(agg["owner_comm"], return_inverse=True)
        self.owner_comm = Col(np.where(owned, ci.reshape(-1), NONE), [dec.comm(c) for c in comms.tolist()])
        self._endpoints = None

    def reason_is(self, *names: str) -> np.ndarray:
        return np.isin(self.end_reason.codes, [REASONS.index(r) for r in names if r in REASONS])

    def role_is(self, name: str) -> np.ndarray:
        return self.role.codes == ROLES.index(name)

    def endpoints(self) -> tuple[Col, Col, Col, Col, Col]:
        """(family, laddr, raddr, lport, rport), laddr and raddr in one code space (Col.choose
        between them works), as Tracker.from_fold sets them (None and 0 without a family)."""
        if self._endpoints is None:
            ev = self.lives["ev"]
            af = ev["family"].astype(np.int64)
            n = self.n
            sa = np.ascontiguousarray(ev["saddr"]).reshape(n, 16)
            da = np.ascontiguousarray(ev["daddr"]).reshape(n, 16)
            family = dec.endpoint_families(af, sa, da).astype(np.int64)
            known = family != 0
            family[~known] = NONE
            both = np.concatenate([sa, da])
            both_af = np.concatenate([af, af])
            key = np.concatenate([both, both_af.astype(np.uint8)[:, None]], axis=1)
            first, inv = unique_rows(key)
            names = []
            for k in key[first]:
                a = int(k[16])
                names.append(dec.addr(a, k[:16].tobytes()) if a in (dec.AF_INET, dec.AF_INET6) else None)
            laddr = np.where(known, inv[:n], NONE)
            raddr = np.where(known, inv[n:], NONE)
            zero = np.zeros(n, dtype=np.int64)
            self._endpoints = (Col(family), Col(laddr, names), Col(raddr, names),
                               Col(np.where(known, ev["sport"].astype(np.int64), zero)),
                               Col(np.where(known, ev["dport"].astype(np.int64), zero)))
        return self._endpoints


class FoldedCloses:
    """The per-connection side of a session from LIFE columns (see the module's text).

    route(batch) takes a batch's LIFE records and the events the tracker follows, and
    returns the tuples for Tracker.feed_all; advance(now) counts the records whose hold is
    over; finish() the rest. Counted into: tracker.counters (connections, closed,
    sequence_gaps), state_times.add_many, end_reasons, and each watcher's columns method
    (watchers() gives (the Lifecycle callback, its columns method or None)); when a watcher
    takes no columns, the records go to the tracker instead."""

    def __init__(self, tracker, state_times, end_reasons: Counter,
                 watchers: Callable[[], list[tuple[Callable, Callable | None]]]):
        self.tracker = tracker
        self.state_times = state_times
        self.end_reasons = end_reasons
        self.watchers = watchers
        self.hold_ns = tracker.hold_ns
        self._chunks: list[np.ndarray] = []  # records waiting for trailing events (LIFE_DTYPE)
        self._next_count = 0
        self._last_now = 0  # the latest advance: records due by then count as finished
        self.counted = 0  # records counted here (not by the tracker)
        self.handed = 0   # records handed to the tracker

    def _hold(self, lives: np.ndarray) -> None:
        self._chunks.append(lives)  # joined when counted or searched, not at each batch

    def _joined(self) -> np.ndarray | None:
        if len(self._chunks) > 1:
            self._chunks = [_cat(*self._chunks)]
        return self._chunks[0] if self._chunks else None

    @property
    def held(self) -> np.ndarray | None:
        """The records waiting for trailing events (LIFE_DTYPE), or None."""
        return self._joined()

    @held.setter
    def held(self, value) -> None:
        self._chunks = [value] if value is not None and len(value) else []

    def route(self, events: np.ndarray, lives: np.ndarray) -> list:
        """events: the batch's events the tracker follows (EVENT_DTYPE); lives: its LIFE
        records. Returns what the tracker is fed, in order: held records of earlier batches
        that an event of this one follows first, then the batch's events with its records
        the tracker must see at their time."""
        first = None
        if len(events) and self._chunks and self._wants(events):
            first = self._followed(events)  # (they are older than anything in this batch)
        tracked = lives[:0]
        if len(lives) and any(cols is None for _, cols in self.watchers()):
            tracked = lives  # a watcher wants Lifecycle objects: the tracker's, at once
        elif len(lives):
            agg, ev = lives["agg"], lives["ev"]
            lflags = agg["lflags"]
            keep = ~(((lflags & _DESTROYED) != 0) & (agg["path_len"] == 0))  # never a state change
            tracker_rows = np.zeros(len(lives), dtype=bool)
            state = events["kind"] == _STATE if len(events) else None
            # its start may be an entry-less lifecycle of the tracker's, or become one in this batch
            if self.tracker.entryless.at or (state is not None and (state & (events["gen"] == 0)).any()):
                tracker_rows |= (ev["flags"] & _BIRTH_UNSEEN) != 0
            born = state is not None and (state & (events["oldstate"] == _CLOSE) & (events["newstate"] == _LISTEN)).any()
            if self.tracker.listeners or born:  # the tracker names an accepted socket's owner from its listener
                # (a connect()ed socket's path starts CLOSE -> SYN_SENT: no need to work out its role)
                path = agg["path"]
                cand = ((lflags & _LISTENER) == 0) & keep & ~(
                    (path[:, 0] == _CLOSE) & (path[:, 1] == _SYN_SENT) & ((ev["flags"] & _BIRTH_UNSEEN) == 0))
                maybe = np.zeros(len(lives), dtype=bool)
                if cand.any():
                    role, _ = shapes(_take(lives, cand))
                    maybe[np.flatnonzero(cand)[role == ROLES.index("passive")]] = True
                if born:  # a listener of this batch, not known to the tracker yet
                    tracker_rows |= maybe
                else:
                    for i in np.flatnonzero(maybe).tolist():
                        netns = int(ev["netns"][i]) if ev["flags"][i] & _NETNS else None
                        if (netns, int(ev["sport"][i])) in self.tracker.listeners:
                            tracker_rows[i] = True
            mine = keep & ~tracker_rows
            destroyed = mine & ((lflags & _DESTROYED) != 0)  # finished at once, as Tracker._life does
            held = mine & ~destroyed
            if held.any() and len(events) and self._wants(events):  # followed within this batch
                rows = _take(lives, held)
                hit = self._hits(rows, events)
                if hit.any():
                    idx = np.flatnonzero(held)
                    tracker_rows[idx[hit]] = True
                    held[idx[hit]] = False
            if tracker_rows.any():
                tracked = _take(lives, tracker_rows)
            if destroyed.any():
                self._count(_take(lives, destroyed))
            if held.any():
                self._hold(_take(lives, held) if not held.all() else lives)
        self.handed += len(tracked) + (0 if first is None else len(first))
        out = Batch(events, tracked).tuples(True)
        return life_tuples(first) + out if first is not None else out

    @staticmethod
    def _wants(events: np.ndarray) -> bool:
        """Could an event of these follow a held record (one with a generation, or an errno
        report: by ports)?"""
        return bool((events["gen"] != 0).any() or (events["kind"] == _ERROR).any())

    @staticmethod
    def _hits(rows: np.ndarray, events: np.ndarray) -> np.ndarray:
        """Rows (LIFE records) an event of their connection follows: by generation, or by ports
        for an errno report without one (Tracker._error)."""
        gens = rows["ev"]["gen"]
        hit = np.isin(gens, events["gen"][events["gen"] != 0])
        errs = events[(events["kind"] == _ERROR) & (events["gen"] == 0)]
        if len(errs):
            ports = rows["ev"]["sport"].astype(np.int64) << 16 | rows["ev"]["dport"].astype(np.int64)
            hit |= np.isin(ports, errs["sport"].astype(np.int64) << 16 | errs["dport"].astype(np.int64))
        return hit

    def _followed(self, events: np.ndarray):
        """The held records that an event of their connection follows, taken out of the hold;
        not those whose hold was over at the last advance (the Tracker would have finished
        them then: the event finds no connection there either)."""
        held = self.held
        hit = self._hits(held, events)
        if self._last_now:
            hit &= held["ev"]["ts_ns"].astype(np.int64) + self.hold_ns > self._last_now
        if not hit.any():
            return None
        self.held = _take(held, ~hit)
        return _take(held, hit)

    def advance(self, now_ns: int, at_once: bool = False) -> None:
        """Count the records whose hold is over at now_ns; at most every COUNT_EVERY_NS
        unless at_once (each count has a fixed cost in numpy calls: a busy consumer polls
        small batches)."""
        self._last_now = max(self._last_now, now_ns)
        if not self._chunks or (not at_once and now_ns < self._next_count):
            return
        self._next_count = now_ns + COUNT_EVERY_NS
        cut = now_ns - self.hold_ns  # records at or before it are due
        due, keep = [], []
        for chunk in self._chunks:  # whole chunks, and the one the cut goes through split
            ts = chunk["ev"]["ts_ns"].astype(np.int64)
            if int(ts.max()) <= cut:
                due.append(chunk)
            elif int(ts.min()) > cut:
                keep.append(chunk)
            else:
                before, rest = _split(chunk, ts <= cut)
                due.append(before)
                keep.append(rest)
        self._chunks = keep
        if due:
            self._count(_cat(*due) if len(due) > 1 else due[0])

    def finish(self) -> None:
        held, self.held = self.held, None
        if held is not None and len(held):
            self._count(held)

    def _count(self, lives: np.ndarray) -> None:
        watchers = self.watchers()
        if any(cols is None for _, cols in watchers):  # one wants Lifecycle objects: the tracker's
            self.tracker.feed_all(life_tuples(lives))
            self.handed += len(lives)
            return
        n = len(lives)
        self.counted += n
        ts = lives["ev"]["ts_ns"]
        if not (ts[1:] >= ts[:-1]).all():  # in end order ("latest"); a ring's usually is
            lives = _take(lives, np.argsort(ts, kind="stable"))
        ev, agg = lives["ev"], lives["agg"]
        c = self.tracker.counters
        c.connections += n
        c.closed += n
        c.events += n  # (as the Tracker counts each record fed)
        c.sequence_gaps += int(agg["gaps"].sum())
        # the time in each state the fold timed (Tracker._life: on_state_time for each)
        mask = agg["state_mask"].astype(np.int64)
        state_ns = agg["state_ns"]
        for st in np.flatnonzero(np.bitwise_or.reduce(mask) >> np.arange(16) & 1).tolist():
            sel = (mask >> st & 1) != 0
            self.state_times.add_many(st, state_ns[sel, st])
        role, before = shapes(lives)
        lflags = agg["lflags"]
        rr = (lflags & _RST_RECEIVED) != 0
        rst_sent = (lflags & _RST_SENT) != 0
        ends = end_rules.Ends(role == ROLES.index("listener"), np.zeros(n, dtype=bool), before, rr,
                              np.full(n, -1, dtype=np.int64), rst_sent,
                              np.where(rst_sent, agg["rst_reason"].astype(np.int64), -1))
        rule, _, _, _ = end_rules.classify_columns(ends, self.tracker.reset_reasons)
        destroyed = (lflags & _DESTROYED) != 0
        tw = time_wait_from(ev["oldstate"].astype(np.int64)) & ~rr & ~destroyed & (rule == _ACTIVE_CLOSE)
        counts = np.bincount(rule, minlength=len(end_rules.REASON_OF_RULE))
        for i in np.flatnonzero(counts).tolist():
            self.end_reasons[end_rules.REASON_OF_RULE[i]] += int(counts[i])
        if watchers:
            rows = ClosedRows(lives, role, rule, tw)
            for _, cols in watchers:
                cols(rows)
