"""The connection state machine: decoded events in, transitions and lifecycles out.

One `Lifecycle` per connection, keyed by the generation the kernel assigned
at birth (socket addresses are reused within microseconds). Owners are taken
only from transitions that run in the owner's process context; `current` in
softirq transitions is whoever the packet interrupted (on loopback, the peer).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from tcplife_trace.probes import decode as dec
from tcplife_trace.probes.decode import Ev, as_ev
from . import end_rules
from .end_rules import ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT, RST_REASONS  # noqa: F401
# the vocabularies and small rules live in analysis/rules.py; ROLES, OWNER_SOURCES, BIRTHS and
# END_REASONS stay importable from here
from .rules import (ACTING, BIRTHS, CLOSERS, END_REASONS, OWNER_RANK, OWNER_SOURCES, ROLES, SRC_NONE,  # noqa: F401
                    enters_time_wait, guess_role)
from tcplife_trace.probes.event_layout import PATH_MAX, PIDS_MAX, EventKind, Flag, LifeFlag
from tcplife_trace.probes.filters import Filters
from tcplife_trace.probes.tcp_states import TcpState as S

_CLOSE = int(S.CLOSE)
_KIND_STATE = int(EventKind.STATE)
_KIND_LIFE = int(EventKind.LIFE)

_F_BIRTH_UNSEEN = int(Flag.BIRTH_UNSEEN)
_L_RST_RECEIVED, _L_RST_SENT, _L_DESTROYED, _L_REUSED, _L_LISTENER = (
    int(LifeFlag.RST_RECEIVED), int(LifeFlag.RST_SENT), int(LifeFlag.DESTROYED), int(LifeFlag.REUSED),
    int(LifeFlag.LISTENER))
_I_LISTENER_PID, _I_LISTENER_COMM = dec.LIFE_INDEX["listener_pid"], dec.LIFE_INDEX["listener_comm"]
_N_EV = len(dec.Ev._fields)
_F_NETNS, _F_UID = int(Flag.NETNS), int(Flag.UID)
_V4MAPPED, _ZERO16 = b"\0" * 10 + b"\xff\xff", b"\0" * 16
_MASK_STATES: dict[tuple, tuple] = {}  # (state_mask, path) -> the states timed, in path order
# where struct tlt_agg's fields sit in a decoded LIFE tuple
(_I_START, _I_EOF, _I_ENTER, _I_LAST, _I_STATE_NS, _I_OWNER_PID, _I_PIDS, _I_RST_REASON, _I_OWNER_COMM, _I_MASK, _I_SRC,
 _I_NPIDS, _I_PATH_LEN, _I_RST_STATE, _I_LFLAGS, _I_GAPS, _I_GAP_HAD, _I_GAP_GOT, _I_PATH) = (
    dec.LIFE_INDEX[k] for k in ("start_ns", "eof_ns", "enter_ns", "last_ns", "state_ns", "owner_pid", "pids", "rst_reason", "owner_comm",
                                "state_mask", "owner_src", "npids", "path_len", "rst_state", "lflags", "gaps",
                                "gap_had", "gap_got", "path"))
_F_EOF = int(Flag.EOF)
(_I_CGROUP, _I_RETRANS, _I_SYN_RETRANS, _I_RECOVERIES, _I_LOSSES, _I_HEALTH_MASK, _I_HEALTH) = (
    dec.LIFE_INDEX[k] for k in ("cgroup_id", "retrans", "syn_retrans", "recoveries", "losses", "health_mask", "health"))
_L_RETRANS, _L_CONG = int(LifeFlag.RETRANS), int(LifeFlag.CONG)

DEFAULT_HOLD_NS = 50_000_000  # trailing events (reset sent, errno) arrive right after CLOSE
DEFAULT_MAX_OPEN = 262_144


class Lifecycle:
    __slots__ = (
        "conn_id", "skaddr", "role", "family", "laddr", "lport", "raddr", "rport", "netns", "uid",
        "owner_pid", "owner_comm", "owner_source", "pids", "birth_seen", "start_ns", "end_ns",
        "state", "state_enter_ns", "path", "state_ns", "closed", "end_reason", "end_detail",
        "errno", "rst_received", "rst_sent", "time_wait", "tx_b", "rx_b", "eof_ns", "incomplete",
        "last_ns", "listener_pid", "listener_comm", "view_cache", "seq", "first_seq", "first_ts", "early",
        # the kernel's fold adds (a LIFE record; None: not known, as from events alone): the owner's
        # cgroup v2 id, retransmits counted as they happened, and tcp_sock's health at the end as
        # (health_mask, health[] as its bytes, btf.TCP_SOCK_HEALTH order): probes/health.from_fold makes the columns
        "cgroup_id", "retrans", "syn_retrans", "recoveries", "losses", "health_raw",
    )

    def __init__(self, conn_id, skaddr: int, role: str, ts_ns: int, birth_seen: bool):
        self.conn_id = conn_id
        self.skaddr = skaddr
        self.role = role
        self.family = self.laddr = self.raddr = self.netns = self.uid = None
        self.lport = self.rport = 0
        self.owner_pid = self.owner_comm = None
        self.owner_source = "none"
        self.pids: set[int] = set()
        self.birth_seen = birth_seen
        self.start_ns = ts_ns
        self.end_ns = None
        self.state: int | None = None
        self.state_enter_ns: int | None = None
        self.path: list[int] = []
        self.state_ns: dict[int, int] = {}
        self.closed = False
        self.end_reason = self.end_detail = None
        self.errno = None
        self.rst_received = False
        self.rst_sent: tuple[int, int] | None = None  # (reason, state)
        self.time_wait = False
        self.tx_b = self.rx_b = None
        self.eof_ns = None
        self.incomplete: list[str] = []
        self.last_ns = ts_ns
        self.listener_pid = self.listener_comm = None
        self.view_cache = None  # a view's rendering of the parts that rarely change
        # the kernel's sequence number of the last state change applied, and of the first (its
        # time): a change that arrives after later ones of its connection is told by it
        self.seq = self.first_seq = self.first_ts = None
        self.early: list | None = None  # such changes from before the first: put in front at the end
        self.cgroup_id = self.retrans = self.syn_retrans = self.recoveries = self.losses = None
        self.health_raw: tuple | None = None

    def set_owner(self, pid: int, comm: str, source: str) -> None:
        if source != "listener":
            self.pids.add(pid)
        if OWNER_RANK[source] < OWNER_RANK[self.owner_source]:
            self.owner_pid, self.owner_comm, self.owner_source = pid, comm, source

    @property
    def duration_ns(self) -> int | None:
        if self.end_ns is None or not self.birth_seen:
            return None
        return self.end_ns - self.start_ns

    @property
    def last_state_before_close(self) -> int | None:
        return self.path[-2] if len(self.path) >= 2 and self.path[-1] == S.CLOSE else None



class Transition:
    """One state change as the tracker understood it."""
    __slots__ = ("lc", "ts_ns", "oldstate", "newstate", "dur_ns", "cur_pid", "cur_comm_raw", "note")

    def __init__(self, lc: Lifecycle, ts_ns: int, oldstate: int, newstate: int, dur_ns,
                 cur_pid: int, cur_comm_raw: bytes, note: str):
        self.lc, self.ts_ns, self.oldstate, self.newstate = lc, ts_ns, oldstate, newstate
        self.dur_ns, self.cur_pid, self.cur_comm_raw, self.note = dur_ns, cur_pid, cur_comm_raw, note

    @property
    def cur_comm(self) -> str:
        return dec.comm(self.cur_comm_raw)


ENTRYLESS_BASE = 1 << 63  # ids of connections without a kernel generation (these count up from 1)
ENTRYLESS_NOTE = "kernel connection map full: followed from its events (reads and writes not attributed while it had no entry)"


class EntrylessIds:
    """Connection ids for sockets the kernel's connection map had no entry for (generation 0:
    the map was full when they were born). Their events name only the socket address, and an
    address is one connection from one birth to the next: each gets ENTRYLESS_BASE + n, in
    recorded order. When the map has room again, such a socket gets an entry mid-life; its
    first event with a generation carries BIRTH_UNSEEN, and `adopt` hands over the id it had
    so that its events (or the kernel's fold from then on) continue the same connection.
    The live Tracker and the offline frames (tcplife_trace/frames/by_connection.py) both number
    connections with this class, fed the same events in the same order."""

    def __init__(self):
        self.at: dict[int, list] = {}  # skaddr -> [id, CLOSE seen]
        self.made = 0

    def _make(self, skaddr: int, closed: bool) -> int:
        self.made += 1
        cid = ENTRYLESS_BASE + self.made
        self.at[skaddr] = [cid, closed]
        return cid

    def state(self, skaddr: int, old: int, new: int) -> tuple[int, int | None]:
        """The id of an entry-less transition, and the id of an open connection that it ends
        without a CLOSE (its address was born again), if any."""
        cur = self.at.get(skaddr)
        if cur is not None and not cur[1] and (old, new) not in BIRTHS:
            cur[1] = new == _CLOSE
            return cur[0], None
        return self._make(skaddr, new == _CLOSE), (cur[0] if cur is not None and not cur[1] else None)

    def born(self, skaddr: int) -> int | None:
        """A socket with a generation is born at this address: the open entry-less connection
        that was there (freed without a CLOSE), if any."""
        cur = self.at.pop(skaddr, None)
        return cur[0] if cur is not None and not cur[1] else None

    def other(self, skaddr: int, create: bool) -> int | None:
        """The id for another entry-less event (a reset) at this address."""
        cur = self.at.get(skaddr)
        if cur is not None:
            return cur[0]
        return self._make(skaddr, False) if create else None

    def adopt(self, skaddr: int) -> int | None:
        """The socket at this address got a map entry mid-life: the id of its open entry-less
        connection, which continues under the generation from now on."""
        cur = self.at.get(skaddr)
        if cur is None or cur[1]:
            return None
        del self.at[skaddr]
        return cur[0]


class Counters:
    def __init__(self):
        self.events = 0
        self.connections = 0          # lifecycles created
        self.closed = 0               # lifecycles finished and reported
        self.filtered = 0             # lifecycles dropped by -p/-L/-D/-4/-6
        self.evicted = 0              # open lifecycles dropped at the table cap
        self.unmatched_errors = 0     # errno reports with no connection to attach to
        self.resets_no_socket = 0     # RSTs this host sent for segments with no socket
        self.sequence_gaps = 0        # transitions whose old state was not the one we had
        self.out_of_order = 0         # transitions that arrived after later ones of their connection
        self.synack_retransmits = 0   # SYN-ACKs re-sent for half-open handshakes


class Tracker:
    """Feeds on `Ev` records in ring-buffer order; calls back with transitions and finished lifecycles."""

    def __init__(self, filters: Filters | None = None, *,
                 on_transition: Callable[[Transition], None] | None = None,
                 on_close: Callable[[Lifecycle], None] | None = None,
                 on_state_time: Callable[[int, int], None] | None = None,
                 max_open: int = DEFAULT_MAX_OPEN, hold_ns: int = DEFAULT_HOLD_NS):
        self.filters = filters or Filters()
        self.on_transition = on_transition
        self.on_close = on_close
        self.on_state_time = on_state_time
        self.max_open = max_open
        self.hold_ns = hold_ns
        self.reset_reasons = end_rules.kernel_reset_reasons()  # BTF read here, not at the first close
        self.live: dict[object, Lifecycle] = {}
        self.listeners: dict[tuple, Lifecycle] = {}
        self.pending: deque[Lifecycle] = deque()      # closed, waiting for trailing events
        self.pending_ports: dict[tuple, Lifecycle] = {}
        self.entryless = EntrylessIds()
        self.counters = Counters()
        # (netns, listener port) -> [SYN-ACK retransmits, {request sockets}] (the set is capped)
        self.synack: dict[tuple, list] = {}
        self._filtering = self.filters.active()
        self._dispatch = {int(k): v for k, v in {
            EventKind.STATE: self._state, EventKind.DESTROY: self._destroy,
            EventKind.RECV_RESET: self._recv_reset, EventKind.SEND_RESET: self._send_reset,
            EventKind.ERROR: self._error, EventKind.IO_OWNER: self._io, EventKind.EOF: self._eof,
            EventKind.FILTERED: self._filtered, EventKind.SYNACK: self._synack,
            EventKind.LIFE: self._life,
        }.items()}

    # -- input -------------------------------------------------------------
    def feed(self, ev: Ev) -> None:
        self.feed_all((ev,))

    def feed_all(self, events) -> None:
        state, dispatch = self._state, self._dispatch
        n = 0
        for ev in events:
            n += 1
            if ev[13] == _KIND_STATE:  # ev.kind: the hot path
                state(ev)
            else:
                handler = dispatch.get(ev[13])
                if handler:
                    handler(ev if ev[13] == _KIND_LIFE else as_ev(ev))
        self.counters.events += n

    def advance(self, now_ns: int) -> None:
        """Finish closed connections whose trailing events are overdue."""
        pending = self.pending
        while pending and pending[0].end_ns + self.hold_ns <= now_ns:
            self._finish(pending.popleft())

    def finish(self) -> list[Lifecycle]:
        """End of the stream: finish every closed connection; return those still open."""
        while self.pending:
            self._finish(self.pending.popleft())
        still = [lc for lc in self.live.values() if not lc.closed]
        for lc in still:
            if lc.early:
                self._put_early(lc)
        return still

    # -- helpers -----------------------------------------------------------
    def _key(self, ev: Ev, create: bool = False):
        # without a generation (connection map full) the address says which connection
        if ev.gen:
            return ev.gen
        return self.entryless.other(ev.skaddr, create) if ev.skaddr else None

    def _new(self, key, skaddr: int, ts_ns: int, role: str, birth_seen: bool) -> Lifecycle:
        lc = Lifecycle(key, skaddr, role, ts_ns, birth_seen)
        if key >= ENTRYLESS_BASE:
            lc.incomplete.append(ENTRYLESS_NOTE)
        return self._add(lc)

    def _adopt(self, gen: int, skaddr: int) -> Lifecycle | None:
        """An entry-less connection at skaddr got a map entry: it goes on under gen."""
        old = self.entryless.adopt(skaddr)
        lc = self.live.pop(old, None) if old is not None else None
        if lc is not None:
            lc.conn_id = gen
            self.live[gen] = lc
        return lc

    def _reborn(self, cid, ts_ns: int) -> None:
        """The address of an open entry-less connection was born again: it ended unseen."""
        lc = self.live.get(cid)
        if lc is not None and not lc.closed:
            lc.incomplete.append(_gone_note(lc.state, reused=True))
            lc.closed, lc.end_ns = True, ts_ns
            self._finish(lc)

    def _add(self, lc: Lifecycle) -> Lifecycle:
        """Follow a new lifecycle (the oldest open one makes room at the cap)."""
        if len(self.live) >= self.max_open:
            self._evict()
        self.live[lc.conn_id] = lc
        self.counters.connections += 1
        return lc

    def _evict(self) -> None:
        for key, lc in self.live.items():
            if not lc.closed:
                del self.live[key]
                self._forget_listener(lc)
                self.counters.evicted += 1
                return

    def _get(self, ev: Ev) -> Lifecycle:
        key = self._key(ev, create=True)
        lc = self.live.get(key)
        if lc is None:
            if ev.gen and ev.flags & _F_BIRTH_UNSEEN and self.entryless.at:
                lc = self._adopt(ev.gen, ev.skaddr)
            if lc is None:
                lc = self._new(key, ev.skaddr, ev.ts_ns, "unknown", birth_seen=False)
        return lc

    def _tuple_from(self, lc: Lifecycle, ev: Ev) -> None:
        ev = as_ev(ev)
        if lc.family is not None and ev.sport == lc.lport and (ev.dport == lc.rport or not ev.dport):
            return  # nothing new
        family = dec.endpoint_family(ev)
        if family is None:
            return
        if lc.family is None:
            lc.netns = dec.netns(ev)
            lc.uid = dec.uid(ev)
        lc.family = family
        if ev.sport:
            lc.lport = ev.sport
        if ev.dport:
            lc.rport = ev.dport
        laddr, raddr = dec.addr(ev.af, ev.saddr_raw), dec.addr(ev.af, ev.daddr_raw)
        if laddr not in ("0.0.0.0", "::") or lc.laddr is None:
            lc.laddr = laddr
        if raddr not in ("0.0.0.0", "::") or lc.raddr is None:
            lc.raddr = raddr

    def matches(self, lc: Lifecycle) -> bool:
        """The filters' verdict on what is known so far. A connection whose port or owner is
        not known yet does not match: under -p a pre-forked worker's accepted socket
        appears from its first read or write; under a cgroup filter the owner's cgroup is the
        kernel fold's (the events' and the LIFE record's cgroup_id)."""
        pids = set(lc.pids)
        if lc.listener_pid is not None:
            pids.add(lc.listener_pid)
        return self.filters.match(family=lc.family, lport=lc.lport or None, rport=lc.rport or None,
                                  role=lc.role, owner_pids=tuple(pids), cgroup_id=lc.cgroup_id)

    def kept(self, lc: Lifecycle) -> bool:
        """Passes the filters (always, when there are none)."""
        return not self._filtering or self.matches(lc)

    def _forget_listener(self, lc: Lifecycle) -> None:
        if lc.role == "listener":
            key = (lc.netns, lc.lport)
            if self.listeners.get(key) is lc:
                del self.listeners[key]

    # -- event handlers ----------------------------------------------------
    def _state(self, ev: Ev) -> None:
        (ts, skaddr, gen, _tx, _rx, _netns, pid, _tid, _uid, _value, sport, dport, _af, _kind,
         old, new, flags, _sa, _da, comm_raw, seq, cgroup) = ev
        role = BIRTHS.get((old, new))
        lc = self.live.get(gen) if gen else None
        if lc is not None and lc.seq is not None and (seq - lc.seq) & 0xFFFF >= 0x8000:
            self._late(lc, ev)  # (seq wraps: "before" is a backward distance below half the range)
            return
        if not gen:
            key, ended = self.entryless.state(skaddr, old, new)
            if ended is not None:
                self._reborn(ended, ts)
            lc = self.live.get(key) if not role else None
            if lc is None:
                lc = self._new(key, skaddr, ts, role or "unknown", birth_seen=role is not None)
        elif role:
            if self.entryless.at and (ended := self.entryless.born(skaddr)) is not None:
                self._reborn(ended, ts)
            lc = self._new(gen, skaddr, ts, role, birth_seen=True)
        else:
            if lc is None and flags & _F_BIRTH_UNSEEN and self.entryless.at:
                lc = self._adopt(gen, skaddr)
            if lc is None:
                lc = self._new(gen, skaddr, ts, "unknown", birth_seen=False)
        if lc.role == "unknown":
            lc.role = guess_role(old, new, lc.role)
        if lc.family is None or sport != lc.lport or (dport and dport != lc.rport):
            self._tuple_from(lc, ev)
        dur = None
        if lc.state is not None and lc.state != old:
            lc.incomplete.append(f"missed events between {S(lc.state).name} and {S(old).name}")
            self.counters.sequence_gaps += 1
        elif lc.state_enter_ns is not None:
            dur = ts - lc.state_enter_ns
            state_ns = lc.state_ns
            state_ns[old] = state_ns.get(old, 0) + dur
            if self.on_state_time:
                self.on_state_time(old, dur)
        path = lc.path
        if not path:
            path.append(old)
        path.append(new)
        lc.state = new
        lc.state_enter_ns = lc.last_ns = ts
        if cgroup:  # the kernel's fold's owner's cgroup after this event (0: no owner yet, no fold)
            lc.cgroup_id = cgroup
        if gen:
            lc.seq = seq
            if lc.first_seq is None:
                lc.first_seq, lc.first_ts = seq, ts

        if role == "active":
            lc.set_owner(pid, dec.comm(comm_raw), "connect")
        elif role == "listener":
            lc.set_owner(pid, dec.comm(comm_raw), "listen")
            self.listeners[(lc.netns, lc.lport)] = lc
        elif role == "passive":
            listener = self.listeners.get((lc.netns, lc.lport))
            if listener and listener.owner_pid is not None:
                lc.listener_pid, lc.listener_comm = listener.owner_pid, listener.owner_comm
                lc.set_owner(listener.owner_pid, listener.owner_comm, "listener")
        elif (old, new) in CLOSERS:
            lc.set_owner(pid, dec.comm(comm_raw), "close")

        note = ""
        if new == _CLOSE:
            lc.end_ns = ts
            lc.closed = True
            if flags & dec.F_BYTES:
                lc.tx_b, lc.rx_b = ev[3], ev[4]
            if enters_time_wait(old, lc.rst_received):
                lc.time_wait = True
                note = "TIME_WAIT"
            self._forget_listener(lc)
            self.pending.append(lc)
            self.pending_ports[(lc.lport, lc.rport)] = lc
        if self.on_transition and (not self._filtering or self.matches(lc)):
            self.on_transition(Transition(lc, ts, old, new, dur, pid, comm_raw, note))

    def _late(self, lc: Lifecycle, ev: tuple) -> None:
        """A state change that arrived after later ones of its connection (the overflow path
        when the consumer was far behind). One from before the first change seen (its birth,
        say) is kept and put in front when the lifecycle is reported (`_put_early`); one
        from between two changes already applied cannot be: the time in those states was
        already counted. Either way it is counted, and shown as it arrives."""
        self.counters.out_of_order += 1
        ts, old, new, seq = ev[0], ev[14], ev[15], ev[20]
        if not lc.birth_seen and lc.first_seq is not None and (seq - lc.first_seq) & 0xFFFF >= 0x8000:
            if lc.early is None:
                lc.early = []
            lc.early.append(ev)
        else:
            lc.incomplete.append(f"a change {S(old).name} -> {S(new).name} arrived after later ones: left out")
        if self.on_transition and (not self._filtering or self.matches(lc)):
            self.on_transition(Transition(lc, ts, old, new, None, ev[6], ev[19], "out of order"))

    def _put_early(self, lc: Lifecycle) -> None:
        """The changes that arrived late from before the first one applied, in front of the
        path, in the kernel's order, with their times, the birth and the owner they tell."""
        first = lc.first_seq
        early = sorted(lc.early, key=lambda e: ((e[20] - first + 0x8000) & 0xFFFF) - 0x8000)
        lc.early = None
        front = [early[0][14]]
        for prev, e in zip([None, *early], early):
            if prev is not None:
                if prev[15] != e[14]:
                    lc.incomplete.append(f"missed events between {S(prev[15]).name} and {S(e[14]).name}")
                    self.counters.sequence_gaps += 1
                    front.append(e[14])
                else:
                    self._dwell(lc, e[14], e[0] - prev[0])
            front.append(e[15])
        last = early[-1]
        if lc.path and lc.path[0] == last[15]:
            self._dwell(lc, last[15], lc.first_ts - last[0])
            lc.path[:1] = front
        else:
            if lc.path:
                lc.incomplete.append(f"missed events between {S(last[15]).name} and {S(lc.path[0]).name}")
                self.counters.sequence_gaps += 1
            lc.path[:0] = front
        if lc.family is None:
            for e in early:
                self._tuple_from(lc, e)
        b = early[0]
        role = BIRTHS.get((b[14], b[15]))
        lc.start_ns = b[0] if role else min(lc.start_ns, b[0])
        if role:
            lc.birth_seen, lc.role = True, role
            if role == "passive":
                listener = self.listeners.get((lc.netns, lc.lport))
                if listener and listener.owner_pid is not None:
                    lc.listener_pid, lc.listener_comm = listener.owner_pid, listener.owner_comm
                    lc.set_owner(listener.owner_pid, listener.owner_comm, "listener")
        for e in early:
            source = ACTING.get((e[14], e[15]))
            if source:
                lc.set_owner(e[6], dec.comm(e[19]), source)

    def _dwell(self, lc: Lifecycle, state: int, ns: int) -> None:
        lc.state_ns[state] = lc.state_ns.get(state, 0) + ns
        if self.on_state_time:
            self.on_state_time(state, ns)

    def _destroy(self, ev: Ev) -> None:
        lc = self.live.get(self._key(ev))
        if lc is None:
            return
        if not lc.path:  # read or written, never a state change: never connected (send() before
            del self.live[lc.conn_id]  # connect(), a failed one): not a connection that ended
            self.counters.connections -= 1
            return
        if not lc.closed:
            lc.incomplete.append(_gone_note(lc.state, reused=ev.value == 1))
            lc.closed, lc.end_ns = True, ev.ts_ns
        self._finish(lc)

    def _recv_reset(self, ev: Ev) -> None:
        lc = self._get(ev)
        lc.rst_received = True
        lc.last_ns = ev.ts_ns

    def _send_reset(self, ev: Ev) -> None:
        if not ev.skaddr:
            self.counters.resets_no_socket += 1
            return
        lc = self.live.get(self._key(ev))
        if lc is not None:
            lc.rst_sent = (ev.value, ev.oldstate)

    def _error(self, ev: Ev) -> None:
        lc = self.live.get(ev.gen) if ev.gen else None
        if lc is None:
            lc = self.pending_ports.get((ev.sport, ev.dport))
            if lc is None:
                self.counters.unmatched_errors += 1
                return
        lc.errno = ev.value

    def _io(self, ev: Ev) -> None:
        lc = self._get(ev)
        if OWNER_RANK["io"] < OWNER_RANK[lc.owner_source]:
            lc.set_owner(ev.pid, dec.comm(ev.comm_raw), "io")
        else:
            lc.pids.add(ev.pid)
        if ev.flags & _F_EOF and lc.eof_ns is None:
            lc.eof_ns = ev.ts_ns
        if ev.cgroup_id:  # (the owner it made, its cgroup, as the kernel's fold has them)
            lc.cgroup_id = ev.cgroup_id
        if lc.uid is None:
            lc.uid = dec.uid(ev)
        if lc.netns is None:
            lc.netns = dec.netns(ev)

    def _eof(self, ev: Ev) -> None:
        lc = self._get(ev)
        if lc.eof_ns is None:
            lc.eof_ns = ev.ts_ns

    def _filtered(self, ev: Ev) -> None:
        lc = self.live.pop(self._key(ev), None)
        if lc is not None:
            self._forget_listener(lc)
            self.counters.filtered += 1

    def _synack(self, ev: Ev) -> None:
        self.counters.synack_retransmits += 1
        entry = self.synack.get((dec.netns(ev), ev.sport))
        if entry is None:
            entry = self.synack[(dec.netns(ev), ev.sport)] = [0, set()]
        entry[0] += 1
        if len(entry[1]) < 100_000:
            entry[1].add(ev.tx_b)

    def _life(self, rec: tuple) -> None:
        """A whole connection folded by the kernel (aggregated mode): the lifecycle that
        `_state` and the other handlers would have built from its events, rule for rule."""
        if rec[_I_LFLAGS] & _L_DESTROYED and not rec[_I_PATH_LEN]:
            return  # never a state change (as _destroy)
        lc = None
        if rec[16] & _F_BIRTH_UNSEEN and self.entryless.at:  # flags
            lc = self._adopt(rec[2], rec[1])
        if lc is not None:  # its start came as events (the map was full), the rest folded
            times = join_fold(lc, self.from_fold(rec), rec)
            self.counters.sequence_gaps += times is None  # (as the stream counts it)
        else:
            lc = self._add(self.from_fold(rec))
            times = lc.state_ns.items()
        self.counters.sequence_gaps += rec[_I_GAPS]  # gaps
        if self.on_state_time:
            for s, ns in times or ():
                self.on_state_time(s, ns)
        # the closing event's fields, by their decode.Ev positions
        lc.closed = True
        lc.end_ns = rec[0]                      # ts_ns
        oldstate = rec[14]
        if rec[_I_LFLAGS] & _L_DESTROYED:
            lc.incomplete.append(_gone_note(oldstate, reused=bool(rec[_I_LFLAGS] & _L_REUSED)))
            self._finish(lc)
            return
        if rec[16] & dec.F_BYTES:               # flags
            lc.tx_b, lc.rx_b = rec[3], rec[4]
        if enters_time_wait(oldstate, lc.rst_received):
            lc.time_wait = True
        self.pending.append(lc)
        self.pending_ports[(lc.lport, lc.rport)] = lc

    def open_folds(self, recs: list[tuple]) -> tuple[list[Lifecycle], set]:
        """Lifecycles of the connections the kernel is folding (conn_map.open_folds), and the
        ids of the entry-less lifecycles they continue (those are not open twice). Nothing
        here is changed: the records may be read again, and the connections go on."""
        out, replaced = [], set()
        for rec in recs:
            fold = self.from_fold(rec)
            cur = self.entryless.at.get(rec[1]) if rec[16] & _F_BIRTH_UNSEEN and self.entryless.at else None
            start = self.live.get(cur[0]) if cur is not None and not cur[1] else None
            if start is not None:
                replaced.add(start.conn_id)
                lc = copy_lifecycle(start)
                lc.conn_id = fold.conn_id
                join_fold(lc, fold, rec)
                fold = lc
            out.append(fold)
        return out, replaced

    def from_fold(self, rec: tuple) -> Lifecycle:
        """A Lifecycle (not registered, not closed) from a struct tlt_life tuple: a LIFE
        record, or an open connection's map entry.
        Field positions: decode.Ev, then struct tlt_agg (see decode.AGG_FMT)."""
        # rec[:21] is in decode.Ev's order (as _state unpacks it), then struct tlt_agg's fields
        gen, skaddr, flags, af = rec[2], rec[1], rec[16], rec[12]
        path_len = rec[_I_PATH_LEN]
        path = list(rec[_I_PATH][:path_len] if path_len <= PATH_MAX else rec[_I_PATH])
        birth = BIRTHS.get((path[0], path[1])) if len(path) >= 2 else None
        birth_seen = birth is not None and not flags & _F_BIRTH_UNSEEN
        lc = Lifecycle(gen, skaddr, birth if birth_seen else "unknown", rec[_I_START], birth_seen)
        if not birth_seen:
            role = "unknown"
            for old, new in zip(path, path[1:]):
                if role != "unknown":
                    break
                role = guess_role(old, new, role)
            lc.role = role
        if af:  # _tuple_from on a lifecycle with no tuple yet
            saddr, daddr = rec[17], rec[18]
            if af == dec.AF_INET:
                lc.family = 4
            elif af == dec.AF_INET6:
                lc.family = 4 if daddr[:12] == _V4MAPPED or (daddr == _ZERO16 and saddr[:12] == _V4MAPPED) else 6
            if lc.family is not None:
                lc.lport, lc.rport = rec[10], rec[11]
                lc.laddr, lc.raddr = dec.addr(af, saddr), dec.addr(af, daddr)
        lc.netns = rec[5] if flags & _F_NETNS else None
        lc.uid = rec[8] if flags & _F_UID else None
        lc.path = path
        if path_len > PATH_MAX:
            lc.incomplete.append(f"path of {path_len} states: the middle ones are not kept")
        shape = (rec[_I_MASK], rec[_I_PATH], path_len)
        states = _MASK_STATES.get(shape)
        if states is None:  # the states timed, in the order they were left (as the stream has them)
            mask = rec[_I_MASK]
            in_path = [st for st in dict.fromkeys(path) if mask >> st & 1]
            states = tuple(in_path + [st for st in range(16) if mask >> st & 1 and st not in in_path])
            if len(_MASK_STATES) > 4096:
                _MASK_STATES.clear()
            _MASK_STATES[shape] = states
        lc.state_ns = {st: rec[_I_STATE_NS + st] for st in states}
        lc.state = path[-1] if path else None
        lc.state_enter_ns, lc.last_ns = rec[_I_ENTER] or None, rec[_I_LAST] or rec[_I_START]
        owner_src = rec[_I_SRC]
        if owner_src < SRC_NONE:
            lc.owner_pid, lc.owner_comm, lc.owner_source = rec[_I_OWNER_PID], dec.comm(rec[_I_OWNER_COMM]), OWNER_SOURCES[owner_src]
        lc.pids = set(rec[_I_PIDS:_I_PIDS + min(rec[_I_NPIDS], PIDS_MAX)])
        if rec[_I_LFLAGS] & _L_LISTENER:  # the kernel's listener table had it at SYN_RECV
            lc.listener_pid, lc.listener_comm = rec[_I_LISTENER_PID], dec.comm(rec[_I_LISTENER_COMM])
        elif lc.role == "passive":  # the listener's owner, as the Tracker finds it at SYN_RECV
            listener = self.listeners.get((lc.netns, lc.lport))
            if listener and listener.owner_pid is not None:
                lc.listener_pid, lc.listener_comm = listener.owner_pid, listener.owner_comm
                if lc.owner_source == "none":
                    lc.owner_pid, lc.owner_comm, lc.owner_source = (listener.owner_pid, listener.owner_comm,
                                                                    "listener")
        gaps, lflags = rec[_I_GAPS], rec[_I_LFLAGS]
        if gaps:
            lc.incomplete.append(f"missed events between {S(rec[_I_GAP_HAD]).name} and {S(rec[_I_GAP_GOT]).name}")
            if gaps > 1:
                lc.incomplete.append(f"and {gaps - 1} more gaps")
        if lflags:
            lc.rst_received = bool(lflags & _L_RST_RECEIVED)
            if lflags & _L_RST_SENT:
                lc.rst_sent = (rec[_I_RST_REASON], rec[_I_RST_STATE])
        if rec[_I_EOF]:
            lc.eof_ns = rec[_I_EOF]
        take_fold_extras(lc, rec)
        return lc

    # -- end of a connection -----------------------------------------------
    def _finish(self, lc: Lifecycle) -> None:
        if self.live.get(lc.conn_id) is not lc:
            return  # already finished (destroy came first) or evicted
        del self.live[lc.conn_id]
        if lc.early:
            self._put_early(lc)
        if self.pending_ports.get((lc.lport, lc.rport)) is lc:
            del self.pending_ports[(lc.lport, lc.rport)]
        if lc.role == "unknown" and lc.path:
            lc.role = guess_role(lc.path[0], lc.path[1] if len(lc.path) > 1 else lc.path[0], "unknown")
        lc.end_reason, lc.end_detail, lc.errno = classify_end(lc)
        if lc.end_reason != "active_close":
            lc.time_wait = False
        if self._filtering and not self.matches(lc):
            self.counters.filtered += 1
            return
        self.counters.closed += 1
        if self.on_close:
            self.on_close(lc)


# what only the kernel's fold knows of a connection (a lifecycle built from events alone has
# None): taken from its LIFE record by take_fold_extras
FOLD_EXTRAS = ("cgroup_id", "retrans", "syn_retrans", "recoveries", "losses", "health_raw")


def take_fold_extras(lc: Lifecycle, rec: tuple) -> None:
    """FOLD_EXTRAS from a struct tlt_life tuple (a LIFE record or an open connection's entry):
    the owner's cgroup id (with an owner from the kernel), the retransmits and episodes counted
    where their tracepoint was traced, and the health read at the end (health_mask not 0).
    A lifecycle built from a connection's events takes them from its LIFE record the same way."""
    if rec[_I_SRC] < SRC_NONE:
        lc.cgroup_id = rec[_I_CGROUP] or None
    lflags = rec[_I_LFLAGS]
    if lflags & _L_RETRANS:
        lc.retrans, lc.syn_retrans = rec[_I_RETRANS], rec[_I_SYN_RETRANS]
    if lflags & _L_CONG:
        lc.recoveries, lc.losses = rec[_I_RECOVERIES], rec[_I_LOSSES]
    if rec[_I_HEALTH_MASK]:
        lc.health_raw = (rec[_I_HEALTH_MASK], rec[_I_HEALTH])  # (health[] as bytes: health.from_fold)


def take_fold_extras_batch(lifecycles: dict, lives) -> int:
    """FOLD_EXTRAS of lifecycles built from events (a stream Tracker's `live`, by conn_id) from
    a batch of LIFE records (probes.event_layout.LIFE_DTYPE: a stream Batch's `lives`), each
    taken by its generation; returns how many found their lifecycle. A LIFE record is released
    with its connection's CLOSE or after it (probes/stream.py), while the Tracker still holds
    the closed lifecycle (hold_ns): a stream session calls this once it has fed the batch's
    events, before it releases the held lifecycles, and they carry what the kernel's fold adds."""
    if not len(lives) or not lifecycles:
        return 0
    found = 0
    get = lifecycles.get
    gens = lives["ev"]["gen"].tolist()
    recs = None
    for i, gen in enumerate(gens):
        lc = get(gen)
        if lc is None or not gen:
            continue
        if recs is None:
            recs = dec.life_tuples(lives)
        take_fold_extras(lc, recs[i])
        found += 1
    return found


def copy_lifecycle(lc: Lifecycle) -> Lifecycle:
    out = Lifecycle.__new__(Lifecycle)
    for name in Lifecycle.__slots__:
        v = getattr(lc, name)
        setattr(out, name, v.copy() if isinstance(v, (list, dict, set)) else v)
    return out


def join_fold(lc: Lifecycle, fold: Lifecycle, rec: tuple):
    """Continue lc (built from the events of a connection the kernel map had no entry for)
    with the kernel's fold from the moment it had one, as its events would have continued
    it; returns the (state, ns) dwells that the fold adds, or None if they do not join (a
    state change is missing between the two)."""
    times: dict[int, int] = {}
    joined = True
    if fold.path:
        if lc.state is not None and fold.path[0] != lc.state:
            lc.incomplete.append(f"missed events between {S(lc.state).name} and {S(fold.path[0]).name}")
            joined = False
            path = fold.path
        else:
            path = fold.path[1:] if lc.path else fold.path
            if lc.state_enter_ns is not None and not rec[_I_GAPS]:
                # the fold's first transition left lc's state; the fold's dwells are contiguous
                # up to its last transition, so that one's time is the last less their sum
                left = rec[_I_ENTER] - sum(fold.state_ns.values())
                times[lc.state] = left - lc.state_enter_ns
        for st, ns in fold.state_ns.items():
            times[st] = times.get(st, 0) + ns
        for st, ns in times.items():
            lc.state_ns[st] = lc.state_ns.get(st, 0) + ns
        lc.path.extend(path)
        lc.state, lc.state_enter_ns = fold.state, fold.state_enter_ns
    if rec[_I_LAST]:
        lc.last_ns = rec[_I_LAST]
    if fold.lport:
        lc.lport = fold.lport
    if fold.rport:
        lc.rport = fold.rport
    if fold.laddr not in (None, "0.0.0.0", "::"):
        lc.laddr = fold.laddr
    if fold.raddr not in (None, "0.0.0.0", "::"):
        lc.raddr = fold.raddr
    if lc.family is None:
        lc.family = fold.family
    if lc.netns is None:
        lc.netns = fold.netns
    if lc.uid is None:
        lc.uid = fold.uid
    if fold.owner_source not in ("none", "listener"):
        lc.set_owner(fold.owner_pid, fold.owner_comm, fold.owner_source)
    lc.pids |= fold.pids
    lc.rst_received = lc.rst_received or fold.rst_received
    lc.rst_sent = fold.rst_sent or lc.rst_sent
    if lc.eof_ns is None:
        lc.eof_ns = fold.eof_ns
    lc.incomplete += [note for note in fold.incomplete if note not in lc.incomplete]
    if lc.role == "unknown":
        lc.role = fold.role
    for f in FOLD_EXTRAS:  # what only the kernel's fold counts (cgroup, retransmits, health)
        if getattr(fold, f) is not None:
            setattr(lc, f, getattr(fold, f))
    return times.items() if joined else None


def _gone_note(state: int | None, reused: bool) -> str:
    where = S(state).name if state else "unknown state"
    if reused:  # seen on FIN_WAIT1 orphans of a network namespace being deleted
        return f"no CLOSE: freed in {where} with no destroy seen (its address was born again)"
    return f"destroyed in {where} without a CLOSE"


def classify_end(lc: Lifecycle) -> tuple[str, str | None, int | None]:
    """(end_reason, detail, the errno its owner saw): analysis/end_rules.py on what the
    lifecycle saw around its CLOSE."""
    before = lc.last_state_before_close
    rst = lc.rst_sent
    return end_rules.classify(end_rules.Ends(
        lc.role == "listener", not lc.closed, before or 0, lc.rst_received, -1 if lc.errno is None else lc.errno,
        rst is not None, rst[0] if rst else -1))
