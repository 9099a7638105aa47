"""`--lifecycles`' text lines (views.TextView.lifecycle) of the connections of one release as
columns, from the kernel's folded records (analysis/closes.ClosedRows), with no Lifecycle
object per connection: byte for byte the line TextView.lifecycle gives for the Lifecycle the
Tracker would make of the same record (Tracker.from_fold and _life);
tests/test_lifecycle_lines.py holds them equal on a real mixed workload, with -w, -T and -t.

The pieces are batches.py's blocks (an (n, width) uint8 array each, NUL-padded, joined and
the NULs removed): the owner, the endpoints, the byte counts, the lifetime and the end are
taken from small tables of the release's distinct values or computed as digits from the
columns; the STATES cell is made once per shape of connection (its path, whether its birth
was seen, which states were timed, TIME_WAIT) and filled with each row's times.

`ColumnLifecycles` is the close watcher the trace registers: the connections the Tracker
still makes into Lifecycle objects (the few that need it: analysis/closes.py) get their line
from TextView.lifecycle, the rest from `lines`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tcplife_trace.analysis.closes import NONE, ClosedRows
from tcplife_trace.analysis.rules import BIRTHS
from .batches import BatchFormatter, _choose, _const, _digits, _joined, _pad_to, _table, ms_text
from tcplife_trace.probes import health as health_mod
from tcplife_trace.probes.event_layout import PATH_MAX, Flag, LifeFlag
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.probes.tcp_states import state_name
from tcplife_trace.probes.unique_rows import unique_rows
from .views import Clock, TextView

_F_BYTES, _F_BIRTH_UNSEEN = int(Flag.BYTES), int(Flag.BIRTH_UNSEEN)
_L_DESTROYED = int(LifeFlag.DESTROYED)
_CLOSE = int(S.CLOSE)


def states_shape(path: tuple, birth_seen: bool, time_wait: bool, timed_states: set) -> tuple[list[bytes], tuple]:
    """views.states_compact's text of a closed connection of this shape, as the pieces around
    its times, and the states whose times go between them (in path order)."""
    parts, timed, seen = [], [], set()
    for st in (path[1:] if birth_seen else path):
        if st in seen or st == _CLOSE:  # (closed: its CLOSE is the end, not a state)
            continue
        seen.add(st)
        if st in timed_states:
            parts.append(state_name(st) + ":%.3f")
            timed.append(st)
        else:  # in it since before the trace
            parts.append(f"{state_name(st)}:?")
    if time_wait:
        parts.append("TIME_WAIT")
    pieces = " ".join(parts).split("%.3f")  # (state names hold no '%')
    return [p.encode() for p in pieces], tuple(timed)


class LifecycleLines:
    """TextView.lifecycle's lines (wide, hms, seconds as TextView) for ClosedRows."""

    def __init__(self, clock: Clock, *, wide: bool = False, hms: bool = False, seconds: bool = False,
                 encoding: str = "utf-8", errors: str = "strict"):
        self.text = TextView(clock, wide=wide, hms=hms, seconds=seconds)
        self.fmt = BatchFormatter(clock, "text", wide=wide, hms=hms, seconds=seconds,
                                  encoding=encoding, errors=errors)
        self.wide, self.hms, self.seconds = wide, hms, seconds
        self.encoding, self.errors = encoding, errors
        self._shapes: dict[bytes, tuple[list[bytes], tuple]] = {}

    def _enc(self, s: str) -> bytes:
        return s.encode(self.encoding, self.errors)

    def _cells(self, col, fmt: str) -> np.ndarray:
        """A Col (analysis/closes.Col) as cells: fmt % value, '-' for None."""
        codes = col.codes
        uniq, inv = np.unique(codes, return_inverse=True)
        vals = [self._enc(fmt % ("-" if c == NONE else col.decode(int(c)) or "-")) for c in uniq.tolist()]
        return _table(vals)[inv.reshape(-1)]

    def _kb(self, b: np.ndarray, has: np.ndarray) -> np.ndarray:
        """'%-5s' of str(bytes // 1024), '-' without a count."""
        return _choose(has, _digits(np.where(has, b // 1024, 0), 5), _const(b"-    ", len(b)))

    @staticmethod
    def _padded(block: np.ndarray, width: int) -> np.ndarray:
        """A block's text (its NULs do not count) left-justified to width with spaces ('%-Ns')."""
        return np.concatenate([block, _pad_to(np.count_nonzero(block, axis=1), width)], axis=1)

    def lines(self, rows: ClosedRows) -> bytes:
        n = rows.n
        if not n:
            return b""
        lives = rows.lives
        ev, agg = lives["ev"], lives["agg"]
        sp = _const(b" ", n)
        out = []
        end_ns = rows.end_ns
        if self.hms:
            out.append(self.fmt._hms(end_ns))
        if self.seconds:
            out.append(self.fmt._seconds(end_ns))
        # the owner: "%-7s %-*.*s"
        owned = rows.owner_pid.codes != NONE
        c = self.text.comm_w
        out += [_choose(owned, _digits(np.where(owned, rows.owner_pid.codes, 0), 7), _const(b"-      ", n)), sp,
                self._cells(rows.owner_comm, f"%-{c}.{c}s"), sp]
        # the endpoints: "%-*s %-5s %-*s %-5s" ('-' for no address or port)
        _, laddr, raddr, lport, rport = rows.endpoints()
        a = self.text.addr_w
        ports = self.fmt.port_table()
        out += [self._cells(laddr, f"%-{a}s"), sp, ports[lport.codes], sp,
                self._cells(raddr, f"%-{a}s"), sp, ports[rport.codes], sp]
        # the byte counts: a record that reached CLOSE with them (not a destroyed one)
        destroyed = (agg["lflags"] & _L_DESTROYED) != 0
        has_bytes = ((ev["flags"] & _F_BYTES) != 0) & ~destroyed
        out += [self._kb(ev["tx_b"].astype(np.int64), has_bytes), sp,
                self._kb(ev["rx_b"].astype(np.int64), has_bytes), sp]
        # the lifetime: '%.2f' ms, '>' before it when the birth was not seen; '%-10s'
        birth_seen = self._birth_seen(lives)
        life = ms_text(np.maximum(end_ns - agg["start_ns"].astype(np.int64), 0), 2)
        life = np.concatenate([_choose(birth_seen, np.zeros((n, 1), np.uint8), _const(b">", n)), life], axis=1)
        out += [self._padded(life, 10), sp]
        # the end: '%-14s' of the reason, +TW
        tw = rows.time_wait
        key = rows.end_reason.codes * 2 + tw.astype(np.int64)
        uniq, inv = np.unique(key, return_inverse=True)
        out += [_table([self._enc("%-14s" % (rows.end_reason.decode(int(k) // 2) + ("+TW" if k % 2 else "")))
                        for k in uniq.tolist()])[inv.reshape(-1)], sp]
        if self.wide:
            out.append(self._health(agg))
        out.append(self._states(lives, birth_seen, tw))
        out.append(_const(b"\n", n))
        return _joined(out)

    @staticmethod
    def _birth_seen(lives: np.ndarray) -> np.ndarray:
        """Tracker.from_fold's birth_seen: the path starts with a birth and the kernel saw it."""
        path = lives["agg"]["path"]
        first = path[:, 0].astype(np.int64) << 8 | path[:, 1]
        births = np.array([o << 8 | nw for o, nw in BIRTHS], dtype=np.int64)
        return (np.isin(first, births) & (lives["agg"]["path_len"] >= 2)
                & ((lives["ev"]["flags"] & _F_BIRTH_UNSEEN) == 0))

    def _health(self, agg: np.ndarray) -> np.ndarray:
        """-w's RTT_MS and RETR cells: '%-9s %-5s ', '-' where the fold did not give them."""
        n = len(agg)
        cols = health_mod.fold_columns(agg["health_mask"], agg["health"])
        rtt, rtt_ok = cols["rtt_ms"]  # (not ok where the fold read nothing: no mask bit)
        retr, retr_ok = cols["total_retrans"]
        vals = np.where(rtt_ok, rtt, -1.0)
        uniq, inv = np.unique(vals, return_inverse=True)
        rtt_cells = _table([self._enc("%-9s " % ("-" if v < 0 else "%.3f" % v)) for v in uniq.tolist()])[inv.reshape(-1)]
        retr_cells = _choose(retr_ok, _digits(np.where(retr_ok, retr, 0), 5), _const(b"-    ", n))
        return np.concatenate([rtt_cells, retr_cells, _const(b" ", n)], axis=1)

    def _states(self, lives: np.ndarray, birth_seen: np.ndarray, tw: np.ndarray) -> np.ndarray:
        """views.states_compact of each row: a shape's pieces, its times between them."""
        n = len(lives)
        agg = lives["agg"]
        plen = agg["path_len"].astype(np.int64)
        keep = np.minimum(plen, PATH_MAX)
        path = np.where(np.arange(PATH_MAX) < keep[:, None], agg["path"], 0).astype(np.uint8)
        mask = agg["state_mask"].astype(np.uint16)
        key = np.concatenate([path, keep.astype(np.uint8)[:, None], birth_seen.astype(np.uint8)[:, None],
                              tw.astype(np.uint8)[:, None], mask.view(np.uint8).reshape(n, 2)], axis=1)
        first, inv = unique_rows(key)
        state_ns = agg["state_ns"]
        blocks, width = [], 1
        for j, row in enumerate(first.tolist()):
            k = key[row].tobytes()
            shape = self._shapes.get(k)
            if shape is None:
                p = tuple(int(s) for s in path[row, :keep[row]])
                m = int(mask[row])
                shape = self._shapes[k] = states_shape(p, bool(birth_seen[row]), bool(tw[row]),
                                                       {st for st in range(16) if m >> st & 1})
                if len(self._shapes) > 4096:
                    self._shapes.clear()
            pieces, timed = shape
            sel = np.flatnonzero(inv == j)
            parts = [_const(pieces[0], len(sel))] if pieces[0] else []
            for i, st in enumerate(timed):
                parts.append(self.fmt._text_ms(state_ns[sel, st], np.ones(len(sel), bool)))
                if pieces[i + 1]:
                    parts.append(_const(pieces[i + 1], len(sel)))
            block = np.concatenate(parts, axis=1) if parts else np.zeros((len(sel), 1), np.uint8)
            blocks.append((sel, block))
            width = max(width, block.shape[1])
        out = np.zeros((n, width), np.uint8)
        for sel, block in blocks:
            out[sel, :block.shape[1]] = block
        return out


class ColumnLifecycles:
    """A close watcher for LiveSession (close_watchers, column_watchers): the lines of the
    connections that end, as text, handed to `emit` a release at a time (one str holding
    lines, without the last newline)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self.lines: LifecycleLines | None = None
        self.view: TextView | None = None

    def attach(self, live, *, wide: bool = False, hms: bool = False, seconds: bool = False,
               encoding: str = "utf-8", errors: str = "strict") -> None:
        self.view = TextView(live.clock, wide=wide, hms=hms, seconds=seconds)
        self.lines = LifecycleLines(live.clock, wide=wide, hms=hms, seconds=seconds,
                                    encoding=encoding, errors=errors)
        self._encoding, self._errors = encoding, errors
        live.close_watchers.append(self.closed)
        live.column_watchers[self.closed] = self.closed_columns

    def closed(self, lc) -> None:
        self.emit(self.view.lifecycle(lc))

    def closed_columns(self, rows: ClosedRows) -> None:
        data = self.lines.lines(rows)
        if data:
            self.emit(data[:-1].decode(self._encoding, self._errors))
