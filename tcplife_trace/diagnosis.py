"""The trace and sock_diag snapshots joined into evidence for the leak detectors.

A `Watch` seeds from a full snapshot at start (sockets opened before the trace,
TIME_WAIT, half-open request sockets), polls a cheaper snapshot every few seconds
(no ESTABLISHED, no TIME_WAIT: the trace follows those; ESTABLISHED is looked at once a
minute at most, slower when that look is dear), and keeps the recent connection endings
the trace reports. Sockets are matched to traced connections by namespace + 4-tuple; a
traced connection gives the exact time in its state, an untraced one a lower bound: the
larger of what the kernel's clocks prove (probes/socket_age.py) and the time it has been
seen in that state. Every finding of every look is kept: one that a later look no longer
shows is marked resolved, with when.
"""
from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pandas as pd

from tcplife_trace.analysis import evidence, leaks
from tcplife_trace.analysis.closes import Col, group
from tcplife_trace.analysis.lifecycle import Lifecycle
from tcplife_trace.analysis.rules import HANDSHAKE_STATE, ROLES, handshake_ns
from tcplife_trace.probes import health as health_mod
from tcplife_trace.probes import sock_diag, socket_age, socket_snapshot
from tcplife_trace.probes.event_layout import HEALTH_N, PATH_MAX, LifeFlag
from tcplife_trace.probes.socket_snapshot import Snapshot
from tcplife_trace.probes.tcp_states import state_name
from tcplife_trace.probes.unique_rows import unique_rows

ENDED_WINDOW_NS = 60_000_000_000  # rates are over the last minute at most
SLOT_NS = 5_000_000_000           # endings are counted in 5-second slots, per endpoint and owner
ESTABLISHED_EVERY_S = 60.0        # ESTABLISHED (idle connections, peer piles) at most this often...
ESTABLISHED_COST_SHARE = 0.01     # ...and no more than 1% of the time: a look that took T waits 100 T
_ESTABLISHED = 1 << sock_diag.S.ESTABLISHED
# the detectors whose findings come from ESTABLISHED sockets: a look without them judges nothing there
_NEEDS_ESTABLISHED = {"idle_established", "peer_connection_pile"}
_PENDING_MAX = 4096               # Lifecycles' health waits in a list, tallied as columns this often
HEALTH_KEYS_PER_SLOT = 10_000     # peer-and-owner keys a slot's health tally holds (memory), at most
_EST = int(sock_diag.S.ESTABLISHED)
_L_RETRANS, _L_CONG = int(LifeFlag.RETRANS), int(LifeFlag.CONG)


def _sock_key(s) -> tuple:
    return (s.netns, s.state, s.laddr, s.lport, s.raddr, s.rport)


class Watch:
    def __init__(self, thresholds: leaks.Thresholds | None = None, *, tracker=None, filters=None,
                 poll_states: int = sock_diag.POLL_STATES,
                 open_lifecycles: Callable[[], list[Lifecycle]] | None = None,
                 established_every_s: float | None = ESTABLISHED_EVERY_S):
        self.thresholds = thresholds or leaks.Thresholds()
        self.filters = filters                  # probes.filters.Filters: findings obey -p/-L/-D/-4/-6
        self.poll_states = poll_states
        self.current: list[leaks.Finding] = []  # the findings of the last look
        self.tracker = tracker                  # analysis.lifecycle.Tracker of a live session, if any
        # the session's open connections (LiveSession.open_lifecycles: in the aggregated mode
        # the kernel map holds them); default: the tracker's
        self.open_lifecycles = open_lifecycles
        self.seed: Snapshot | None = None
        self.latest: Snapshot | None = None
        self.latest_counts: dict[str, int] = {}  # sockets per state in the latest snapshot
        self.first_seen: dict[tuple, int] = {}  # socket key -> first snapshot time (ns)
        # slot -> {ending key: count}; a key is ENDED_COLUMNS without the ephemeral port, so that
        # a minute of churn is a few keys, not a million rows
        self.ended: dict[int, Counter] = {}
        self.owner_at: dict[tuple, tuple] = {}  # (netns, addr, port) -> (pid, comm) of the latest ending
        # slot -> the endings' health per peer and owner (evidence.PeerTally, issue 15); Lifecycles'
        # wait in _pending as tuples and are tallied as columns, by the rule the records' are
        self.health: dict[int, evidence.PeerTally] = {}
        self._pending: list[tuple] = []
        self.synack_seed: dict[tuple, tuple[int, int]] = {}
        self.reported: dict[tuple, str] = {}    # finding key -> severity already announced
        self.history: dict[tuple, leaks.Finding] = {}  # every finding of the run, by key (latest version)
        self.established_every_s = established_every_s  # None: periodic looks skip ESTABLISHED
        self._established_due = 0.0             # monotonic s when a periodic look takes ESTABLISHED again
        self.errors: list[str] = []             # what the looks could not read, each once
        self._errors_told = 0
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.started_ns = time.monotonic_ns()
        self.on_snapshot: Callable[[Snapshot, pd.DataFrame], None] | None = None  # e.g. a recording
        from .containers import Resolver
        self.resolver = Resolver()              # the sockets' cgroup ids to cgroups and containers

    # -- inputs --------------------------------------------------------------------------
    def closed(self, lc: Lifecycle) -> None:
        """LiveSession close watcher: count the endings the detectors use (cheap: a tuple for
        the health tally, a dict bump)."""
        hs = handshake_ns(lc.role, lc.path, lc.state_ns)
        est = _EST in lc.path
        self._pending.append(((lc.end_ns or 0) // SLOT_NS, lc.netns, lc.raddr, lc.owner_pid, lc.owner_comm,
                              lc.end_reason, est, lc.retrans, lc.syn_retrans, lc.losses, lc.health_raw, hs))
        if len(self._pending) >= _PENDING_MAX:
            self._tally_pending()
        # failed connects: refused, or timed out before ESTABLISHED (an established connection
        # that timed out is retransmit_deaths', not a connect that failed)
        if not (lc.time_wait or (lc.end_reason in ("refused", "timeout") and not est)):
            return
        active = lc.role == "active"
        # the client side is known by where it connects, the server side by its own port
        key = (lc.netns, lc.role, None if active else lc.laddr, None if active else lc.lport,
               lc.raddr if active else None, lc.rport if active else None,
               lc.owner_pid, lc.owner_comm, lc.end_reason, lc.time_wait)
        slot = (lc.end_ns or 0) // SLOT_NS
        counts = self.ended.get(slot)
        if counts is None:
            counts = self.ended[slot] = Counter()
        counts[key] += 1
        if lc.time_wait:  # its minisocket (TIME_WAIT, or an orphan's FIN_WAIT2) shows in sock_diag
            where = (lc.netns, lc.raddr, lc.rport) if active else (lc.netns, lc.laddr, lc.lport)
            self.owner_at[where] = (lc.owner_pid, lc.owner_comm)

    def closed_columns(self, rows) -> None:
        """closed() for the connections of one release as columns (analysis/closes.ClosedRows):
        the same keys and counts, one dict bump per distinct key."""
        est = _established(rows)
        if rows.n:
            self._tally_rows(rows, est)
        wanted = rows.time_wait | (rows.reason_is("refused", "timeout") & ~est)
        if not wanted.any():
            return
        active = rows.role_is("active")
        _, laddr, raddr, lport, rport = rows.endpoints()
        slot = Col(rows.end_ns // SLOT_NS)
        key = [rows.netns, rows.role, laddr.unless(active), lport.unless(active), raddr.unless(~active),
               rport.unless(~active), rows.owner_pid, rows.owner_comm, rows.end_reason, Col(rows.time_wait.astype(np.int64))]
        for values, n, _ in group(key + [slot], wanted):
            counts = self.ended.get(values[-1])
            if counts is None:
                counts = self.ended[values[-1]] = Counter()
            k = values[:-1]
            counts[k[:-1] + (bool(k[-1]),)] += n
        if rows.time_wait.any():  # the owner of the latest ending at each endpoint
            where = [rows.netns, raddr.choose(active, laddr), rport.choose(active, lport)]
            for values, _, last in group(where, rows.time_wait):
                self.owner_at[values] = (rows.owner_pid.decode(int(rows.owner_pid.codes[last])),
                                         rows.owner_comm.decode(int(rows.owner_comm.codes[last])))

    # -- the endings' health (evidence.ending_values: the one rule, fed as columns) ----------
    def _tally(self, slots: np.ndarray, cols: list[Col], values) -> None:
        """Add ending_values' rows to the slots' tallies, keyed by cols (netns, raddr,
        owner_pid, owner_comm as Col), one dict step per distinct key."""
        codes = np.stack([slots] + [c.codes for c in cols], axis=1)
        first, inv = unique_rows(codes)
        order = np.argsort(first, kind="stable")  # the keys in the order they first came
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        uniq, inv = codes[first[order]], rank[inv]
        listed = uniq.tolist()
        for slot in np.unique(uniq[:, 0]).tolist():
            ids = np.flatnonzero(uniq[:, 0] == slot)
            local = np.full(len(uniq), -1, dtype=np.int64)
            local[ids] = np.arange(len(ids))
            keys = [tuple(c.decode(v) for c, v in zip(cols, listed[i][1:])) for i in ids.tolist()]
            sel = local[inv] >= 0
            tally = self.health.get(slot)
            if tally is None:
                tally = self.health[slot] = evidence.PeerTally(HEALTH_KEYS_PER_SLOT)
            tally.add(keys, local[inv][sel], *(v[sel] for v in values))

    def _tally_rows(self, rows, est: np.ndarray) -> None:
        """A release's LIFE records (ClosedRows; est: _established): their fold's columns into
        ending_values."""
        agg = rows.lives["agg"]
        lflags = agg["lflags"]
        counted, cong = (lflags & _L_RETRANS) != 0, (lflags & _L_CONG) != 0
        h = health_mod.fold_columns(agg["health_mask"], agg["health"])
        hs = fold_handshake_ms(rows.role.codes, agg["path"], agg["path_len"], agg["state_mask"], agg["state_ns"])
        values = evidence.ending_values(
            established=est, timed_out=_reason(rows, "timeout"), reset=_reason(rows, "reset_by_peer"),
            aborted=_reason(rows, "local_abort"),
            retrans=np.where(counted, agg["retrans"].astype(np.int64), -1),
            syn_retrans=np.where(counted, agg["syn_retrans"].astype(np.int64), -1),
            losses=np.where(cong, agg["losses"].astype(np.int64), -1),
            total_retrans=_valid(h["total_retrans"]), data_segs_out=_valid(h["data_segs_out"]),
            rtt_ms=np.where(h["rtt_ms"][1], h["rtt_ms"][0], np.nan), handshake_ms=hs)
        _, _, raddr, _, _ = rows.endpoints()
        self._tally(rows.end_ns // SLOT_NS, [rows.netns, raddr, rows.owner_pid, rows.owner_comm], values)

    def _tally_pending(self) -> None:
        """The Lifecycles closed() kept: as columns into ending_values."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        (slot, netns, raddr, pid, comm, reason, est, retrans, syn_retrans, losses, raw, hs) = zip(*pending)
        n = len(pending)
        masks = np.array([0 if r is None else r[0] for r in raw], dtype=np.uint64)
        vals = np.zeros((n, HEALTH_N), dtype=np.uint64)
        for i, r in enumerate(raw):
            if r is not None:
                v = r[1]
                vals[i] = np.frombuffer(v, dtype="<u8") if isinstance(v, (bytes, bytearray)) else np.asarray(v)
        h = health_mod.fold_columns(masks, vals)
        reason = np.array(reason, dtype=object)

        def ints(xs):
            return np.array([-1 if x is None else x for x in xs], dtype=np.int64)

        values = evidence.ending_values(
            established=np.array(est, dtype=bool), timed_out=reason == "timeout",
            reset=reason == "reset_by_peer", aborted=reason == "local_abort",
            retrans=ints(retrans), syn_retrans=ints(syn_retrans), losses=ints(losses),
            total_retrans=_valid(h["total_retrans"]), data_segs_out=_valid(h["data_segs_out"]),
            rtt_ms=np.where(h["rtt_ms"][1], h["rtt_ms"][0], np.nan),
            handshake_ms=np.array([np.nan if x is None else x / 1e6 for x in hs], dtype=np.float64))
        self._tally(np.array(slot, dtype=np.int64), [_col(netns), _col(raddr), _col(pid), _col(comm)], values)

    @property
    def health_untallied(self) -> int:
        """Endings of the window left out of the health tally (their slot was full of keys)."""
        return sum(t.untallied for t in self.health.values())

    def health_frames(self, now_ns: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The endings' health of the last minute (Evidence.ended_health, .ended_times)."""
        self._tally_pending()
        oldest = (now_ns - ENDED_WINDOW_NS) // SLOT_NS
        for slot in [k for k in self.health if k < oldest]:
            del self.health[slot]
        total = evidence.PeerTally()
        for tally in self.health.values():
            total.merge(tally)
        return total.frames()

    def _synack_now(self) -> dict[tuple, tuple[int, int]]:
        if self.tracker is None:
            return {}
        return {k: (v[0], len(v[1])) for k, v in self.tracker.synack.items()}

    def take_seed(self) -> Snapshot:
        self.synack_seed = self._synack_now()
        self.seed = self._take(sock_diag.ALL_STATES)
        self.started_ns = self.seed.taken_ns
        self._record(self.seed)
        return self.seed

    def record_into(self, recorder) -> None:
        """Every look from now on goes into a recording (recording.RecordingWriter): its sockets
        frame, and in the metadata the namespaces' counters, sysctls, names, sockstat and which
        states it asked for (`states`, a bit per state: the periodic kind may hold ESTABLISHED)."""
        self.on_snapshot = lambda snap, frame: recorder.add_snapshot(
            snap.taken_ns, snap.complete, frame,
            {"mibs": snap.mibs, "sysctls": snap.sysctls, "netns_names": snap.netns_names,
             "sockstat": snap.sockstat, "states": snap.states})

    def _record(self, snap: Snapshot, frame: pd.DataFrame | None = None) -> None:
        """Give a snapshot and its sockets frame to on_snapshot (a recording), if set."""
        if self.on_snapshot is not None:
            self.on_snapshot(snap, self.sockets_frame(snap) if frame is None else frame)

    def _take(self, states: int) -> Snapshot:
        snap = socket_snapshot.take(states)
        for e in snap.errors:
            if e not in self.errors:
                self.errors.append(e)
        for s in snap.sockets:
            self.first_seen.setdefault(_sock_key(s), snap.taken_ns)
        live = {_sock_key(s) for s in snap.sockets}
        if snap.complete:  # forget sockets that are gone, so a reused tuple starts afresh
            self.first_seen = {k: v for k, v in self.first_seen.items() if k in live}
        self.latest = snap
        self.latest_counts = state_counts(snap)
        return snap

    # -- evidence ------------------------------------------------------------------------
    def _traced(self, states: set[int]) -> dict[tuple, Lifecycle]:
        """Open traced connections in these states, keyed like a snapshot's sockets."""
        if self.open_lifecycles is not None:
            lcs = self.open_lifecycles(states)
        elif self.tracker is not None:
            lcs = [lc for lc in self.tracker.live.values() if not lc.closed]
        else:
            return {}
        return {(lc.netns, lc.state, lc.laddr, lc.lport, lc.raddr, lc.rport): lc
                for lc in lcs if lc.state in states}

    def sockets_frame(self, snap: Snapshot) -> pd.DataFrame:
        """The detectors' sockets frame of a snapshot: each socket with its owner (who holds
        it open, else the trace's owner, else for a socket with no file accepted on one of
        our listeners the listener's owner) and its age in its state with where that came from."""
        traced = self._traced({s.state for s in snap.sockets})
        rows = []
        now = snap.taken_ns
        for s in snap.sockets:
            st = state_name(s.state)
            key = _sock_key(s)
            lc = traced.get(key)
            holders = snap.holders.get(s.inode, []) if s.inode else []
            pid = comm = fd = None
            eof_age = None
            if lc is not None and lc.state_enter_ns is not None:
                # the trace saw it enter this state: exact
                age, lower, source = (now - lc.state_enter_ns) / 1e9, False, socket_age.TRACE
                if lc.eof_ns is not None:
                    eof_age = (now - lc.eof_ns) / 1e9
                pid, comm = lc.owner_pid, lc.owner_comm
            else:
                seen = (now - self.first_seen.get(key, now)) / 1e9
                late = (snap.dumped_ns.get(s.netns, now) - now) / 1e9
                age, source = socket_age.age(s, snap.sysctls.get(s.netns), seen, late)
                lower = True
                if lc is not None:
                    pid, comm = lc.owner_pid, lc.owner_comm
                elif s.timer == "timewait":  # a minisocket: the owner of the connection that became it
                    owner = self.owner_at.get((s.netns, s.raddr, s.rport)) or \
                        self.owner_at.get((s.netns, s.laddr, s.lport))
                    if owner is not None:
                        pid, comm = owner
            if holders:  # authoritative: who has it open now
                h = next((h for h in holders if h.pid == pid), holders[0])
                pid, comm, fd = h.pid, h.comm, h.fd
            rows.append((s.netns, st, s.laddr, s.lport, s.raddr, s.rport, s.inode, s.timer, s.rqueue,
                         s.wqueue, None if s.idle_recv_ms is None else s.idle_recv_ms / 1000,
                         None if s.idle_sent_ms is None else s.idle_sent_ms / 1000, pid, comm, fd,
                         max(age, 0.0), lower, eof_age, source))
        frame = _listener_owners(evidence.sockets_frame(rows))
        extra = socket_snapshot.extra_columns(snap.sockets, self.resolver)  # health, cgroup (issue 15)
        return pd.concat([frame, extra.set_axis(frame.index)], axis=1)

    def ended_frame(self, now_ns: int) -> pd.DataFrame:
        """Endings of the last minute, one row per key with its count in `n`."""
        oldest = (now_ns - ENDED_WINDOW_NS) // SLOT_NS
        for slot in [k for k in self.ended if k < oldest]:
            del self.ended[slot]
        if len(self.owner_at) > 100_000:  # bounded: many distinct endpoints, keep the latest
            self.owner_at = dict(list(self.owner_at.items())[-50_000:])
        total: Counter = Counter()
        for counts in self.ended.values():
            total.update(counts)
        df = pd.DataFrame([(*k, n) for k, n in total.items()], columns=[*evidence.ENDED_COLUMNS, "n"])
        df["time_wait"] = df["time_wait"].astype(bool)
        df["n"] = df["n"].astype("int64")
        return df

    def _filtered(self, df: pd.DataFrame) -> pd.DataFrame:
        df = evidence.sockets_matching(df, self.filters)
        if self.filters.cgroups and "cgroup_id" in df.columns and len(df):  # (the endings are kept ones)
            df = df[in_cgroups(df, lambda cid, _path: self.filters.cgroup_match(cid))]
        return df

    def evidence(self, snap: Snapshot) -> evidence.Evidence:
        frame = self.sockets_frame(snap)
        self._record(snap, frame)
        sockets = self._filtered(frame)
        deltas = {}
        if self.seed is not None:
            for ns, now in snap.mibs.items():
                before = self.seed.mibs.get(ns, {})
                deltas[ns] = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}
        deltas, scope = evidence.scoped_counters(deltas, frame, sockets, self.filters)
        new_lis = None
        if self.seed is not None and snap is not self.seed:
            seeded = {_sock_key(s) for s in self.seed.sockets if s.state == sock_diag.S.LISTEN}
            lis = sockets[sockets["state"] == "LISTEN"]
            keys = [(n, int(sock_diag.S.LISTEN), a, p, r, rp) for n, a, p, r, rp in
                    zip(lis["netns"], lis["laddr"], lis["lport"], lis["raddr"], lis["rport"])]
            new_lis = lis[np.array([k not in seeded for k in keys], dtype=bool)]
        synack = {}
        for key, (n, reqs) in self._synack_now().items():
            n0, r0 = self.synack_seed.get(key, (0, 0))
            if n > n0 and key[0] is not None:
                synack[key] = (n - n0, reqs if not r0 else max(reqs - r0, 1))
        synack = evidence.scoped_synack(synack, sockets, self.filters)
        span = min(snap.taken_ns - self.started_ns, ENDED_WINDOW_NS) / 1e9
        ended_health, ended_times = self.health_frames(snap.taken_ns)
        return evidence.Evidence(sockets, self._filtered(self.ended_frame(snap.taken_ns)), max(span, 1e-3), deltas,
                              snap.sysctls, new_lis, synack=synack, complete_snapshot=snap.complete,
                              counter_scope=scope, ended_health=ended_health, ended_times=ended_times)

    # -- outputs -------------------------------------------------------------------------
    def iso(self, mono_ns: int) -> str:
        """A CLOCK_MONOTONIC time (a snapshot's) as ISO-8601 UTC with milliseconds."""
        t = datetime.fromtimestamp((mono_ns + self._wall_offset_ns) / 1e9, tz=timezone.utc)
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def judge(self, snap: Snapshot) -> list[leaks.Finding]:
        """The findings this snapshot supports (kept in the run's history)."""
        found = leaks.find(self.evidence(snap), self.thresholds)
        when = self.iso(snap.taken_ns)
        looked_established = bool(snap.states & _ESTABLISHED)
        keys = set()
        for f in found:
            keys.add(f.key())
            before = self.history.get(f.key())
            f.first_seen_at = before.first_seen_at if before is not None and before.resolved_at is None else when
            self.history[f.key()] = f
        carried = []
        for k, f in self.history.items():
            if k in keys or f.resolved_at is not None:
                continue
            if f.kind in _NEEDS_ESTABLISHED and not looked_established:
                carried.append(f)  # this look could not have seen it: it stands as it was
            else:
                f.resolved_at = when
                self.reported.pop(k, None)  # should it come back, it is news again
        self.current = found + carried
        return self.current

    def _judge(self, states: int) -> list[leaks.Finding]:
        t0 = time.monotonic()
        found = self.judge(self._take(states))
        if states & _ESTABLISHED and self.established_every_s is not None:
            took = time.monotonic() - t0
            self._established_due = time.monotonic() + max(self.established_every_s,
                                                            took / ESTABLISHED_COST_SHARE)
        return found

    def _poll_states(self) -> int:
        """The periodic look's states: ESTABLISHED too when it is due (see ESTABLISHED_EVERY_S)."""
        states = self.poll_states
        if self.established_every_s is not None and not states & _ESTABLISHED \
                and time.monotonic() >= self._established_due:
            states |= _ESTABLISHED
        return states

    def poll(self) -> list[leaks.Finding]:
        """A periodic look; returns findings not announced before (or now more severe)."""
        fresh = []
        for f in self._judge(self._poll_states()):
            prev = self.reported.get(f.key())
            if prev is None or leaks.SEVERITY_RANK[f.severity] > leaks.SEVERITY_RANK[prev]:
                self.reported[f.key()] = f.severity
                fresh.append(f)
        return fresh

    def final(self, full: bool = True) -> list[leaks.Finding]:
        """Every finding a last snapshot supports: a full one (every TIME_WAIT socket: the
        doctor), or the periodic kind with ESTABLISHED (a live trace ending after heavy churn)."""
        return self._judge(sock_diag.ALL_STATES if full else self.poll_states | _ESTABLISHED)

    def all_findings(self) -> list[leaks.Finding]:
        """Every finding of the run: those of the last look (most severe first), then those that
        resolved before it (resolved_at says when), most recent first."""
        current = {f.key() for f in self.current}
        gone = [f for k, f in self.history.items() if k not in current and f.resolved_at is not None]
        gone.sort(key=lambda f: f.resolved_at, reverse=True)
        return list(self.current) + gone

    def new_errors(self) -> list[str]:
        """What the looks could not read, not told before (a live trace says each once)."""
        out = self.errors[self._errors_told:]
        self._errors_told = len(self.errors)
        return out


def _reason(rows, name: str) -> np.ndarray:
    """rows.reason_is(name) for one reason (a comparison of codes, no isin)."""
    values = rows.end_reason.values
    return rows.end_reason.codes == values.index(name) if name in values else np.zeros(rows.n, dtype=bool)


def _established(rows) -> np.ndarray:
    """Which of a release's connections (ClosedRows) got to ESTABLISHED: in the path a
    Lifecycle gets (its first path_len states)."""
    agg = rows.lives["agg"]
    plen = np.minimum(agg["path_len"].astype(np.int64), PATH_MAX)
    return ((np.ascontiguousarray(agg["path"]).reshape(rows.n, PATH_MAX) == _EST)
            & (np.arange(PATH_MAX) < plen[:, None])).any(axis=1)


def _valid(col: tuple) -> np.ndarray:
    """A health.fold_columns column (values, valid) as int64 with -1 where not valid."""
    v, ok = col
    return np.where(ok, v, -1).astype(np.int64)


def _col(values) -> Col:
    """A tuple of plain values (None included) as a Col of codes."""
    index: dict = {}
    codes = np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int64)
    return Col(codes, list(index))


_HS_OF_ROLE = np.full(len(ROLES), -1, dtype=np.int64)
for _role, _st in HANDSHAKE_STATE.items():
    _HS_OF_ROLE[ROLES.index(_role)] = _st


def fold_handshake_ms(role: np.ndarray, path: np.ndarray, path_len: np.ndarray, state_mask: np.ndarray,
                      state_ns: np.ndarray) -> np.ndarray:
    """rules.handshake_ns of LIFE records' folds as columns (role: codes into rules.ROLES; the
    path a Lifecycle gets, its first path_len states): the time in the handshake state when
    its first visit was left for ESTABLISHED, in ms; NaN if none."""
    n = len(role)
    out = np.full(n, np.nan)
    if not n:
        return out
    st = _HS_OF_ROLE[np.asarray(role, dtype=np.int64)]
    path = np.ascontiguousarray(path).reshape(n, PATH_MAX).astype(np.int64)
    plen = np.minimum(np.asarray(path_len, dtype=np.int64), PATH_MAX)
    at = (path == st[:, None]) & (np.arange(PATH_MAX) < (plen - 1)[:, None])
    has = at.any(axis=1) & (st >= 0)
    first = at.argmax(axis=1)
    rows = np.arange(n)
    nxt = path[rows, np.minimum(first + 1, PATH_MAX - 1)]
    timed = (np.asarray(state_mask, dtype=np.int64) >> np.maximum(st, 0) & 1) != 0
    ok = has & (nxt == _EST) & timed
    out[ok] = np.asarray(state_ns)[rows[ok], st[ok]].astype(np.float64) / 1e6
    return out


def in_cgroups(sockets: pd.DataFrame, match: Callable[[int, str | None], bool]) -> np.ndarray:
    """The rows of a sockets frame (with its cgroup columns) that a cgroup filter keeps: a
    socket by the cgroup sock_diag gives it (the task that made it; an accepted socket's is its
    listener's), one verdict per distinct id: match(id, its path in the frame) (live:
    Filters.cgroup_match; a recording: Filters.cgroup_match_recorded). A request socket and a
    TIME_WAIT socket have no cgroup of their own: one on a listener's port (same namespace) goes
    with that listener, any other with the connection it was, kept when the trace gave it an
    owner (the trace hands over only the connections the filter kept)."""
    ids = sockets["cgroup_id"].astype("UInt64")
    known = (ids.notna() & (ids.fillna(0) != 0)).to_numpy(dtype=bool)
    codes = ids.fillna(0).to_numpy(dtype=np.uint64)
    paths = dict(zip(codes[known].tolist(), sockets["cgroup"][known].tolist())) if "cgroup" in sockets.columns else {}
    uniq, inv = np.unique(codes[known], return_inverse=True)
    keep = np.zeros(len(sockets), dtype=bool)
    keep[known] = np.array([match(i, _text(paths.get(i))) for i in uniq.tolist()], dtype=bool)[inv.ravel()]
    netns, lport = sockets["netns"].tolist(), sockets["lport"].tolist()
    state = sockets["state"].to_numpy()
    listeners = {(netns[i], lport[i]): bool(keep[i]) for i in np.flatnonzero(state == "LISTEN").tolist()}
    none = np.flatnonzero(~known)
    owned = sockets["owner_pid"].notna().to_numpy(dtype=bool)[none]
    # (a server's side goes with the listener it was accepted on; a client's, its owner from the
    # trace, which knows only the kept connections)
    keep[none] = [listeners.get((netns[i], lport[i]), o) for i, o in zip(none.tolist(), owned.tolist())]
    return keep


def _text(v) -> str | None:
    return v if isinstance(v, str) else None


def _listener_owners(df: pd.DataFrame) -> pd.DataFrame:
    """A socket with no file and no owner (a request socket, an orphan, a minisocket) that was
    accepted on one of our listeners belongs to that listener's owner."""
    if df.empty:
        return df
    lis = df[(df["state"] == "LISTEN") & df["owner_pid"].notna()]
    orphan = (df["owner_pid"].isna() & (df["inode"] == 0) & (df["state"] != "LISTEN")).to_numpy()
    if lis.empty or not orphan.any():
        return df
    owner = {(ns, a, p): (int(pid), comm) for ns, a, p, pid, comm in
             zip(lis["netns"], lis["laddr"], lis["lport"], lis["owner_pid"], lis["owner_comm"])}
    sub = df[orphan]
    hits = [owner.get((n, a, p)) or owner.get((n, "0.0.0.0", p)) or owner.get((n, "::", p))
            for n, a, p in zip(sub["netns"], sub["laddr"], sub["lport"])]
    if not any(hits):
        return df
    df = df.copy()
    rows = df.index[orphan]
    df.loc[rows, "owner_pid"] = pd.array([h[0] if h else pd.NA for h in hits], dtype="Int64")
    df.loc[rows, "owner_comm"] = [h[1] if h else None for h in hits]
    return df


def state_counts(snap: Snapshot) -> dict[str, int]:
    """Sockets per state, like `netstat -nat | awk '{++S[$NF]}'`, over every namespace. A periodic
    snapshot that skipped TIME_WAIT takes its count from /proc/net/sockstat (minisockets in
    TIME_WAIT and orphaned FIN_WAIT2 together, as the kernel counts them)."""
    c = Counter(state_name(s.state) for s in snap.sockets)
    if not snap.complete and snap.sockstat:
        minisocks = sum(v.get("tw", 0) for v in snap.sockstat.values())
        orphans = sum(1 for s in snap.sockets if s.timer == "timewait")  # FIN_WAIT2 minisockets
        if minisocks - orphans > 0:
            c["TIME_WAIT"] = minisocks - orphans
    return dict(c.most_common())
