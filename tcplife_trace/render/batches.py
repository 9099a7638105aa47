"""The per-transition views (text, JSON, CSV) formatted a batch at a time from the events'
numpy columns and the kernel's fold on each event (probes/event_layout.py: dur_ns, owner_*,
role, xflags, cgroup_id), with no Python object per event: byte for byte what views.TextView.transition,
dumps(transition_record(...)) and csv_rows.CsvRows give for the same transitions
(tests/test_batch_views.py holds them equal on a real workload, line for line).

A line is pieces side by side, each an (n, width) uint8 block: a take from a small table of
formatted values (addresses, commands, owner sources, roles, state pairs, ports: the distinct
values of the batch, formatted once and cached) or decimal digits computed from a column.
Padding past a value's own width is NUL; the blocks joined and the NULs removed are the
batch's lines, one bytes object.

Why the columns suffice for a folded row (xflags & FOLDED): the owner, its source, the role,
the time in the old state and the TIME_WAIT entry are the kernel's fold after the event,
equal to the Tracker's (tests/test_kernel_fold_events.py). The endpoints are the event's
own: the Tracker takes a STATE event's tuple whenever its ports differ from the ones it
has and keeps an earlier value only where the event has 0 (a port, a wildcard address), and
a connection's STATE events never go back to 0: an active socket's first (SYN_SENT) has no
local port yet, an accepted one's first (SYN_RECV) its listener's address and no remote end,
every later one the full tuple (the kernel reads them before it clears anything at CLOSE);
a listener's events all carry the same half tuple. The network namespace is the
connection's, the same on each of its events.

What the columns cannot say, the Tracker renders:
- a STATE row of a socket the full connection map had no entry for (no fold: flags AGG,
  generation 0): every session's tracker follows those events; `ColumnTransitions.attach`
  has it render their lines as it makes their Transitions (views, at that moment), and each
  goes in at its row;
- the rows LiveSession packs from tuples (the start-up check's window, read as tuples: the
  fold is lost, xflags 0 with a generation): such a batch, the trace's very first events, is
  rendered by a Tracker of its own fed that batch, which is what the session's tracker made
  of them when it followed every event from the same start.
"""
from __future__ import annotations

import collections
import csv
import datetime as dt
import io
import json

import numpy as np

from tcplife_trace.analysis.lifecycle import ENTRYLESS_BASE, Lifecycle, Tracker, Transition
from tcplife_trace.probes import decode as dec
from tcplife_trace.probes.stream import _take
from tcplife_trace.probes.event_layout import OWNER_SOURCE_NAMES, ROLE_NAMES, SRC_NONE, EventKind, Flag, XFlag
from tcplife_trace.probes.tcp_states import state_name
from tcplife_trace.probes.unique_rows import unique_rows
from .views import Clock, TextView, dumps, transition_home, transition_record

_STATE = int(EventKind.STATE)
_FOLDED, _DUR, _TW = int(XFlag.FOLDED), int(XFlag.DUR), int(XFlag.TIME_WAIT)
_F_NETNS = int(Flag.NETNS)
_AF_INET, _AF_INET6 = dec.AF_INET, dec.AF_INET6
_SP, _NL = 32, 10
_P10 = 10 ** np.arange(20, dtype=np.uint64)  # 10^0 .. 10^19
_TIE_OR_HUGE = 10 ** 15  # at or past it (11 days in one state) a float's digits are Python's
_CACHE_MAX = 65536
CHUNK_ROWS = 16384  # events formatted at once (a JSON line is about 450 bytes wide as blocks)


# -- blocks ------------------------------------------------------------------------------

def _const(s: bytes, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(s, np.uint8), (n, len(s)))


def _table(values: list[bytes]) -> np.ndarray:
    """Byte strings as an (len, width) uint8 table, NUL-padded to the longest."""
    w = max(1, max(map(len, values), default=1))
    out = np.zeros((len(values), w), np.uint8)
    for i, v in enumerate(values):
        out[i, :len(v)] = np.frombuffer(v, np.uint8)
    return out


def _widen(block: np.ndarray, w: int) -> np.ndarray:
    if block.shape[1] >= w:
        return block
    return np.concatenate([block, np.zeros((block.shape[0], w - block.shape[1]), np.uint8)], axis=1)


def _choose(mask: np.ndarray, yes: np.ndarray, no: np.ndarray) -> np.ndarray:
    """Row by row: yes where mask, else no (blocks NUL-padded to one width)."""
    w = max(yes.shape[1], no.shape[1])
    return np.where(mask[:, None], _widen(yes, w), _widen(no, w))


def _put(block: np.ndarray, rows, values: list[bytes]) -> np.ndarray:
    """These rows' blocks replaced by these strings (Python's own digits for rare rows)."""
    if not len(rows):
        return block
    block = _widen(np.array(block), max(map(len, values)))
    for r, v in zip(rows.tolist(), values):
        block[r] = 0
        block[r, :len(v)] = np.frombuffer(v, np.uint8)
    return block


def _ndigits(v: np.ndarray) -> np.ndarray:
    return np.searchsorted(_P10[1:], v, side="right") + 1


def _digit_block(v: np.ndarray, d: int) -> np.ndarray:
    """The last d decimal digits of each value, zero-filled, as an (n, d) block."""
    out = np.empty((len(v), d), np.uint8)
    for k in range(d - 1, -1, -1):
        v, r = np.divmod(v, 10)
        out[:, k] = r
    out += 48
    return out


def _digits(v: np.ndarray, width: int = 0) -> np.ndarray:
    """Decimal digits of integers below 2**63, right-aligned behind NULs (gone when the line is
    joined: left-justified), then the spaces that pad the number to width."""
    v = np.asarray(v).astype(np.int64)
    nd = _ndigits(v)
    d = int(nd.max()) if len(v) else 1
    out = _digit_block(v, d)
    out[np.arange(d)[None, :] < (d - nd)[:, None]] = 0
    return np.concatenate([out, _pad_to(nd, width)], axis=1) if width else out


def _fixed(v: np.ndarray, k: int) -> np.ndarray:
    """k decimal digits, zero-filled (the fraction of a fixed-point number)."""
    return _digit_block(np.asarray(v).astype(np.int64), k)


def ms_text(ns: np.ndarray, places: int) -> np.ndarray:
    """'%.<places>f' % (ns / 1e6) of each value (0 < places <= 6) as a block: digits from the
    integers (no tie left: rounding up at .5 of the last place is exact), Python's own digits
    on a tie or past 1e15 ns, where the double's rounding decides."""
    unit = 10 ** (6 - places)
    d = np.asarray(ns).astype(np.uint64)
    q = (d + np.uint64(unit // 2)) // np.uint64(unit)
    block = np.concatenate([_digits(q // np.uint64(10 ** places)), _const(b".", len(d)),
                            _fixed(q % np.uint64(10 ** places), places)], axis=1)
    odd = np.flatnonzero((d % np.uint64(unit) == unit // 2) | (d >= _TIE_OR_HUGE))
    fmt = b"%%.%df" % places
    return _put(block, odd, [fmt % (int(x) / 1e6) for x in d[odd].tolist()])


def _pad_to(lengths: np.ndarray, width: int) -> np.ndarray:
    """Spaces that take a field of these lengths to width (NUL where it is already wider)."""
    j = np.arange(width)
    return np.where(j[None, :] < (width - lengths)[:, None], _SP, 0).astype(np.uint8)


def _lengths(block: np.ndarray) -> np.ndarray:
    return np.count_nonzero(block, axis=1)


def _joined(blocks: list[np.ndarray], inserts: dict[int, bytes] | None = None) -> bytes:
    """The blocks side by side, NULs removed: the rows' lines, in order; inserts: lines of
    their own at these rows (whose blocks must be all NUL)."""
    grid = np.concatenate(blocks, axis=1)
    if not inserts:  # (bytes.translate drops the NULs a quarter faster than a boolean mask)
        return grid.tobytes().translate(None, b"\0")
    flat = grid[grid != 0]  # (faster than np.compress on a line's runs of text)
    ends = np.cumsum(_lengths(grid))
    out, at = [], 0
    for row in sorted(inserts):
        start = int(ends[row])  # (the row itself is empty: its end is where it goes)
        out.append(flat[at:start].tobytes())
        out.append(inserts[row])
        at = start
    out.append(flat[at:].tobytes())
    return b"".join(out)


def _bytes_col(events: np.ndarray, name: str) -> np.ndarray:
    col = events[name]
    return np.ascontiguousarray(col).view(np.uint8).reshape(len(events), -1)


class _Cached:
    """Formatted values by key (kept across batches; cleared past _CACHE_MAX)."""

    def __init__(self, render):
        self.render = render
        self.done: dict = {}

    def block(self, keys: list, inv: np.ndarray) -> np.ndarray:
        done = self.done
        if len(done) > _CACHE_MAX:
            done.clear()
        vals = []
        for k in keys:
            v = done.get(k)
            if v is None:
                v = done[k] = self.render(k)
            vals.append(v)
        return _table(vals)[inv]


# -- the formatter -----------------------------------------------------------------------

def _csv_cell(s: str) -> bytes:
    if s == "":
        return b""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([s])
    return buf.getvalue()[:-1].encode()


class BatchFormatter:
    """Lines of a batch's STATE rows in one of the views: text (wide, hms, seconds as
    views.TextView), "json" or "csv". `lines(rows, inserts)` gives one bytes object."""

    def __init__(self, clock: Clock, view: str = "text", *, wide: bool = False, hms: bool = False,
                 seconds: bool = False, encoding: str = "utf-8", errors: str = "strict", csv_rows=None):
        if view not in ("text", "json", "csv"):
            raise ValueError(f"view {view!r}: text, json or csv")
        self.clock, self.view = clock, view
        self.hms, self.seconds = hms, seconds
        self.text = TextView(clock, wide=wide, hms=hms, seconds=seconds)
        self.encoding, self.errors = encoding, errors
        self.addr_w, self.comm_w = self.text.addr_w, self.text.comm_w
        self.csv_rows = csv_rows  # csv_rows.CsvRows: the header goes with the first line
        if view == "csv" and csv_rows is None:
            from .csv_rows import CsvRows
            self.csv_rows = CsvRows()
        enc = self._enc
        if view == "text":
            self._addr = _Cached(lambda k: enc("%-*s" % (self.addr_w, dec.addr(k[0], k[1]))))
            self._comm = _Cached(lambda raw: enc("%-*.*s" % (self.comm_w, self.comm_w, dec.comm(raw) or "-")))
            self._states = _Cached(lambda k: enc("%-11s -> %-11s " % (state_name(k >> 8), state_name(k & 255))))
        else:
            string = self._string
            self._addr = _Cached(lambda k: string(dec.addr(k[0], k[1])))
            self._comm = _Cached(lambda raw: string(dec.comm(raw)))
            sep = b"," if view == "csv" else b',"newstate":'
            self._states = _Cached(lambda k: string(state_name(k >> 8)) + sep + string(state_name(k & 255)))
        # a JSON record's home (views.TRANSITION_HOME) by the fold's cgroup id: resolved once per id
        self._home = _Cached(lambda cg: "".join(f',"{k}":{json.dumps(v)}'
                                                for k, v in transition_home(cg or None).items()).encode())
        self._iso_parts: dict[int, tuple[bytes, bytes]] = {}
        self._ports: np.ndarray | None = None

    # -- values as this view writes them
    def _enc(self, s: str) -> bytes:
        return s.encode(self.encoding, self.errors)

    def _string(self, s: str) -> bytes:
        return json.dumps(s).encode() if self.view == "json" else _csv_cell(s)

    @property
    def _null(self) -> bytes:
        return b"null" if self.view == "json" else b""

    def port_table(self) -> np.ndarray:
        """Every port's cell, 0 as '-' (text, padded to 5) or null."""
        if self._ports is None:
            p = np.arange(65536)
            if self.view == "text":
                t = _digits(p, 5)
                t[0] = 0
                t[0, :5] = np.frombuffer(b"-    ", np.uint8)
            else:
                t = _widen(_digits(p), 5)
                t[0] = 0
                t[0, :len(self._null)] = np.frombuffer(self._null, np.uint8)
            self._ports = t
        return self._ports

    # -- columns
    def _addresses(self, af: np.ndarray, raw: np.ndarray) -> np.ndarray:
        key = np.concatenate([af.astype(np.uint64).view(np.uint8).reshape(-1, 8), raw], axis=1)
        first, inv = unique_rows(key)
        keys = [(int(af[i]), raw[i].tobytes()) for i in first.tolist()]
        block = self._addr.block(keys, inv)
        if self.view != "text":
            known = (af == _AF_INET) | (af == _AF_INET6)
            if not known.all():
                block = _choose(known, block, _const(self._null, len(af)))
        return block

    def _comms(self, raw: np.ndarray, none: np.ndarray | None = None) -> np.ndarray:
        if none is not None and none.any():
            raw = np.where(none[:, None], 0, raw).astype(np.uint8)
        first, inv = unique_rows(raw)
        block = self._comm.block([raw[i].tobytes() for i in first.tolist()], inv)
        if none is not None and self.view != "text" and none.any():
            block = _choose(none, _const(self._null, len(raw)), block)
        return block

    def _names(self, idx: np.ndarray, names) -> np.ndarray:
        table = _table([self._string(x) for x in names])
        return table[np.minimum(idx, len(names) - 1)]

    def _state_pairs(self, ev: np.ndarray) -> np.ndarray:
        key = ev["oldstate"].astype(np.int64) << 8 | ev["newstate"]
        u, inv = np.unique(key, return_inverse=True)
        return self._states.block(u.tolist(), inv.ravel())

    def _text_ms(self, dur: np.ndarray, has: np.ndarray) -> np.ndarray:
        """'%.3f' of dur_ns / 1e6, '-' without one (Python's digits on a tie or past 1e15)."""
        return _choose(has, ms_text(np.where(has, dur, 0), 3), _const(b"-", len(dur)))

    def _repr_ms(self, dur: np.ndarray, has: np.ndarray) -> np.ndarray:
        """repr(dur_ns / 1e6) (the JSON and CSV number), null without one. Below 1e15 ns the
        double's shortest repr is the exact decimal: 6 places, trailing zeros dropped."""
        d = np.where(has, dur, 0).astype(np.uint64)
        ip, fr = d // np.uint64(10 ** 6), d % np.uint64(10 ** 6)
        frac = _fixed(fr, 6)
        zeros = sum((fr % np.uint64(10 ** k) == 0).astype(np.int64) for k in range(1, 7))
        keep = np.maximum(6 - zeros, 1)
        frac = np.where(np.arange(6)[None, :] < keep[:, None], frac, 0).astype(np.uint8)
        block = np.concatenate([_digits(ip), _const(b".", len(d)), frac], axis=1)
        block = _choose(has, block, _const(self._null, len(d)) if self._null else np.zeros((len(d), 1), np.uint8))
        odd = np.flatnonzero(has & ((d < 100) | (d >= _TIE_OR_HUGE)))
        return _put(block, odd, [repr(int(x) / 1e6).encode() for x in d[odd].tolist()])

    def _hms(self, ts: np.ndarray) -> np.ndarray:
        """'HH:MM:SS ' as Clock.hms gives it: asked once per run of rows in one second."""
        sec = (ts.astype(np.int64) + self.clock.offset) // 1_000_000_000
        start = np.ones(len(ts), bool)
        start[1:] = sec[1:] != sec[:-1]
        at = np.flatnonzero(start)
        table = _table([("%-8s " % self.clock.hms(int(ts[i]))).encode() for i in at.tolist()])
        return table[np.cumsum(start) - 1]

    def _seconds(self, ts: np.ndarray) -> np.ndarray:
        """'%-11.6f ' of the seconds since the start (Python's digits on a tie, or before it)."""
        rel = ts.astype(np.int64) - self.clock.start
        odd = np.flatnonzero((rel < 0) | (rel % 1000 == 500) | (rel >= _TIE_OR_HUGE))
        r = np.maximum(rel, 0).astype(np.uint64)
        us = (r + np.uint64(500)) // np.uint64(1000)
        ip = _digits(us // np.uint64(10 ** 6))
        block = np.concatenate([ip, _const(b".", len(ts)), _fixed(us % np.uint64(10 ** 6), 6)], axis=1)
        block = np.concatenate([block, _pad_to(_lengths(ip) + 7, 11)], axis=1)
        block = _put(block, odd, [b"%-11.6f" % ((int(x) - self.clock.start) / 1e9) for x in ts[odd].tolist()])
        return np.concatenate([block, _const(b" ", len(ts))], axis=1)

    def _iso(self, ts: np.ndarray) -> list[np.ndarray]:
        """Clock.iso: the wall clock (float seconds, rounded half-even to microseconds as
        datetime.fromtimestamp does), local time zone; one datetime per distinct second."""
        t = (ts.astype(np.int64) + self.clock.offset) / 1e9
        sec = np.floor(t)
        us = np.rint((t - sec) * 1e6)
        carry = us >= 1e6
        us = np.where(carry, us - 1e6, us).astype(np.uint64)
        sec = (sec + carry).astype(np.int64)
        u, inv = np.unique(sec, return_inverse=True)
        heads, tails = [], []
        parts = self._iso_parts
        if len(parts) > 4096:
            parts.clear()
        for s in u.tolist():
            p = parts.get(s)
            if p is None:
                iso = dt.datetime.fromtimestamp(s, tz=dt.timezone.utc).astimezone().isoformat(timespec="microseconds")
                dot = iso.index(".", 19)
                p = parts[s] = (iso[:dot + 1].encode(), iso[dot + 7:].encode())
            heads.append(p[0])
            tails.append(p[1])
        inv = inv.ravel()
        return [_table(heads)[inv], _fixed(us, 6), _table(tails)[inv]]

    # -- lines
    def lines(self, ev: np.ndarray, inserts: dict[int, bytes] | None = None) -> bytes:
        """The lines of these STATE rows (EVENT_DTYPE, folded), in order; inserts: rows whose
        line is given (rendered by the Tracker), put in at their place."""
        n = len(ev)
        if not n:
            return b""
        if inserts:
            keep = np.ones(n, bool)
            keep[list(inserts)] = False
        else:
            keep = None
        blocks = self._text_blocks(ev) if self.view == "text" else self._record_blocks(ev)
        if keep is not None:
            blocks = [np.where(keep[:, None], b, 0).astype(np.uint8) for b in blocks]
        return _joined(blocks, inserts)

    def _text_blocks(self, ev: np.ndarray) -> list[np.ndarray]:
        n = len(ev)
        sp = _const(b" ", n)
        ts = ev["ts_ns"]
        out = []
        if self.hms:
            out.append(self._hms(ts))
        if self.seconds:
            out.append(self._seconds(ts))
        none = ev["owner_src"] == SRC_NONE
        out += [_choose(~none, _digits(ev["owner_pid"], 7), _const(b"-      ", n)), sp,
                self._comms(_bytes_col(ev, "owner_comm"), none), sp]
        ports = self.port_table()
        af = ev["family"]
        out += [self._addresses(af, _bytes_col(ev, "saddr")), sp, ports[ev["sport"]], sp,
                self._addresses(af, _bytes_col(ev, "daddr")), sp, ports[ev["dport"]], sp,
                self._state_pairs(ev)]
        x = ev["xflags"]
        out.append(self._text_ms(ev["dur_ns"], (x & _DUR) != 0))
        out.append(_choose((x & _TW) != 0, _const(b"  (TIME_WAIT)", n), np.zeros((n, 1), np.uint8)))
        out.append(_const(b"\n", n))
        return out

    def _record_blocks(self, ev: np.ndarray) -> list[np.ndarray]:
        """transition_record's fields, as dumps (JSON) or CsvRows write them."""
        n = len(ev)
        js = self.view == "json"
        null = _const(self._null, n) if self._null else np.zeros((n, 1), np.uint8)

        def sep(name: str) -> np.ndarray:
            return _const(f',"{name}":'.encode() if js else b",", n)

        ts = ev["ts_ns"]
        head, us, tail = self._iso(ts)
        q = b'"' if js else b""
        out = [_const(b'{"type":"transition","time":' + q if js else b"", n), head, us, tail, _const(q, n),
               sep("ts_ns"), _digits(ts), sep("conn_id"), _digits(ev["gen"])]
        none = ev["owner_src"] == SRC_NONE
        out += [sep("pid"), _choose(none, null, _digits(ev["owner_pid"])),
                sep("comm"), self._comms(_bytes_col(ev, "owner_comm"), none),
                sep("owner_source"), self._names(ev["owner_src"], OWNER_SOURCE_NAMES),
                sep("cur_pid"), _digits(ev["pid"]),
                sep("cur_comm"), self._comms(_bytes_col(ev, "comm")),
                sep("role"), self._names(ev["role"], ROLE_NAMES)]
        saddr, daddr = _bytes_col(ev, "saddr"), _bytes_col(ev, "daddr")
        fam = dec.endpoint_families(ev["family"], saddr, daddr)
        ports = self.port_table()
        af = ev["family"]
        netns = (ev["flags"] & _F_NETNS) != 0
        out += [sep("family"), _choose(fam == 0, null, _digits(fam)),
                sep("laddr"), self._addresses(af, saddr), sep("lport"), ports[ev["sport"]],
                sep("raddr"), self._addresses(af, daddr), sep("rport"), ports[ev["dport"]],
                sep("netns"), _choose(netns, _digits(ev["netns"]), null),
                sep("oldstate"), self._state_pairs(ev)]
        x = ev["xflags"]
        out += [sep("ms"), self._repr_ms(ev["dur_ns"], (x & _DUR) != 0),
                sep("note"), _choose((x & _TW) != 0, _const(self._string("TIME_WAIT"), n), null)]
        if js:  # the connection's home: one lookup per distinct cgroup id of the batch
            ids, inv = np.unique(ev["cgroup_id"], return_inverse=True)
            out.append(self._home.block(ids.tolist(), inv.ravel()))
        out.append(_const(b"}\n" if js else b"\n", n))
        if not js:
            out[0] = np.zeros((n, 1), np.uint8)  # (the CSV row starts with its first cell)
        return out

    # -- lines the Tracker made
    def transition_line(self, t: Transition) -> bytes:
        """The line of one Transition, as the per-event path writes it."""
        if self.view == "text":
            t.lc.view_cache = None  # (another view of the same Lifecycle may have left its own there)
            return self._enc(self.text.transition(t)) + b"\n"
        record = transition_record(t, self.clock, home=self.view == "json")
        if self.view == "json":
            return dumps(record).encode() + b"\n"
        return self._enc(self.csv_rows(record)) + b"\n"

    def header(self) -> bytes:
        """The CSV header line, once, before the first row (what CsvRows puts first)."""
        rows = self.csv_rows
        if self.view != "csv" or rows.fields is not None:
            return b""
        return self._enc(rows(transition_record(_HEADER_ONLY, self.clock, home=False)).split("\n", 1)[0]) + b"\n"


# a Transition on an empty Lifecycle: its record gives CsvRows the field names (only its keys are used)
_HEADER_ONLY = Transition(Lifecycle(0, 0, "unknown", 0, False), 0, 7, 7, None, 0, b"", "")


class ColumnTransitions:
    """A session's per-transition view from its batches' columns.

    on_batch(events) (LiveSession's, Session's on_batch) keeps each batch; attach(live) has
    the session's tracker render the lines of the rows without a fold as it makes them;
    take() gives every kept batch's lines, in order, as one bytes object (after the poll that
    handed them out: the tracker has followed those events by then). The formatter may be
    given once the session (its clock) exists, before the first take()."""

    def __init__(self, formatter: BatchFormatter | None = None):
        self.fmt = formatter
        self.pending: list[np.ndarray] = []
        self.tracked: dict[tuple, bytes] = {}  # (ts_ns, skaddr, old, new) -> its line
        self.unmatched = 0  # rows without a fold whose line the tracker did not make

    def attach(self, live) -> None:
        tracker = live.tracker
        before = tracker.on_transition
        if before is None:
            tracker.on_transition = self._tracked
        else:
            def both(t):
                before(t)
                self._tracked(t)
            tracker.on_transition = both

    def _tracked(self, t: Transition) -> None:
        if t.lc.conn_id >= ENTRYLESS_BASE:  # (the only STATE events the kernel sends unfolded)
            self.tracked[(t.ts_ns, t.lc.skaddr, t.oldstate, t.newstate)] = self.fmt.transition_line(t)

    def on_batch(self, events: np.ndarray) -> None:
        self.pending.append(events)

    def take(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self, rows: int = CHUNK_ROWS):
        """take()'s lines as pieces of at most `rows` events' lines each, each kept batch let go
        once formatted: after a look at the sockets the rings' backlog comes as one poll's
        batches (several hundred thousand events at churn), whose lines at once would be
        several times their size in memory."""
        if not self.pending:
            return
        batches, self.pending = self.pending, []
        packed = [b for b in batches if _from_tuples(b)]
        if packed:  # (LiveSession.poll hands them out after its first batch: they came first)
            batches = packed + [b for b in batches if not any(b is p for p in packed)]
        queue = collections.deque(batches)
        del batches
        try:
            head = self.fmt.header()
            if head:
                yield head
            while queue:
                events = queue.popleft()
                if any(events is p for p in packed):
                    yield self._own_tracker_lines(events)
                    continue
                for at in range(0, len(events), rows):
                    data = self._lines(events[at:at + rows])
                    if data:
                        yield data
        finally:
            self.tracked.clear()

    def _lines(self, events: np.ndarray) -> bytes:
        st = _take(events, events["kind"] == _STATE)  # (by positions: a mask on records is slow)
        if not len(st):
            return b""
        unfolded = np.flatnonzero((st["xflags"] & _FOLDED) == 0)
        inserts = {}
        if len(unfolded):
            tracked = self.tracked
            for i, ts, sk, old, new in zip(unfolded.tolist(), st["ts_ns"][unfolded].tolist(),
                                           st["skaddr"][unfolded].tolist(), st["oldstate"][unfolded].tolist(),
                                           st["newstate"][unfolded].tolist()):
                line = tracked.pop((ts, sk, old, new), None)
                if line is None:
                    self.unmatched += 1
                    continue  # (its columns' line: no owner, no duration)
                inserts[i] = line
        return self.fmt.lines(st, inserts)

    def _own_tracker_lines(self, events: np.ndarray) -> bytes:
        lines: list[bytes] = []
        tracker = Tracker(on_transition=lambda t: lines.append(self.fmt.transition_line(t)))
        tracker.feed_all(dec.event_tuples(events))
        return b"".join(lines)


def _from_tuples(events: np.ndarray) -> bool:
    """Packed from tuples (decode.events_array): STATE rows with a generation and no fold,
    which the kernel never sends (a row with a generation has its map entry's fold)."""
    st = (events["kind"] == _STATE) & (events["gen"] != 0)
    return bool(st.any() and ((events["xflags"][st] & _FOLDED) == 0).all())
