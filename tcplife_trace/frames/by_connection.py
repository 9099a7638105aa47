"""A recording's state changes sorted by connection: one sort shared by every frame.

The transitions frame (time in the old state), the lifecycles frame (first/last/any per
connection) and the state durations all need each connection's rows together and in the
order the kernel made them. They are sorted once here: a stable sort by connection, then,
inside a connection whose recorded order disagrees with the kernel's per-connection
sequence number (`seq`, 16 bits, wrapping), by that number. Recorded order is the kernel's
almost always, so only those few connections are sorted again; rows without a map entry
(no sequence number) and rows of equal numbers (imported text) keep recorded order. Each
frame then works on contiguous segments. Arrays are kept narrow
(states as uint8, segment numbers as int32): on a large recording fresh memory is what
costs most.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tcplife_trace.analysis.lifecycle import BIRTHS, EntrylessIds
from tcplife_trace.probes.event_layout import EventKind, Flag

_STATE, _RR, _RS = int(EventKind.STATE), int(EventKind.RECV_RESET), int(EventKind.SEND_RESET)
_ADOPTERS = (int(EventKind.STATE), int(EventKind.RECV_RESET), int(EventKind.IO_OWNER), int(EventKind.EOF))


def _dropped(cols, gen: np.ndarray) -> np.ndarray | None:
    """Which of these rows (their connection ids) belong to connections that a kernel filter
    (-p/-L/-D/-4/-6) dropped part way: the live tracer forgets them, and so do the frames.
    None when the recording has no such connection."""
    fr = np.flatnonzero(cols["kind"] == EventKind.FILTERED)
    filtered = cols.at("gen", fr, ascending=True) if len(fr) else fr
    filtered = filtered[filtered != 0]
    return np.isin(gen, filtered) if len(filtered) else None


def entryless_ids(cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connection ids for a recording whose kernel connection map was full at times: each
    table row's id (the generation, or the one analysis.lifecycle.EntrylessIds gives an event
    without one, fed the same events in the same order as the live Tracker), and the entry-less
    connections that ended without a CLOSE (their address was born again): (ids, times ns)."""
    kind, gen = cols["kind"], cols["gen"]
    ids = gen.astype(np.uint64, copy=True)
    skaddr = cols["skaddr"]
    flags = cols["flags"]
    genless = (gen == 0) & (skaddr != 0) & ((kind == _STATE) | (kind == _RR) | (kind == _RS))
    old, new = cols["oldstate"], cols["newstate"]
    born = np.zeros(len(kind), bool)
    for a, b in BIRTHS:
        born |= (old == a) & (new == b)
    born &= (kind == _STATE) & (gen != 0) & np.isin(skaddr, skaddr[genless])
    adopter = (gen != 0) & ((flags & int(Flag.BIRTH_UNSEEN)) != 0) & np.isin(kind, _ADOPTERS)
    resolver, relabel, ended, ended_ts = EntrylessIds(), {}, [], []
    ts = cols["ts_ns"]
    for r in np.flatnonzero(genless | born | adopter).tolist():
        k, sk = int(kind[r]), int(skaddr[r])
        if gen[r]:
            if born[r]:
                gone = resolver.born(sk)
            else:
                gone = None
                if resolver.at and (was := resolver.adopt(sk)) is not None:
                    relabel[was] = int(gen[r])
            if gone is not None:
                ended.append(gone)
                ended_ts.append(int(ts[r]))
            continue
        if k == _STATE:
            cid, gone = resolver.state(sk, int(old[r]), int(new[r]))
            if gone is not None:
                ended.append(gone)
                ended_ts.append(int(ts[r]))
        else:
            cid = resolver.other(sk, k == _RR) or 0
        ids[r] = cid
    if relabel:  # adopted: their rows go on under the generation they got
        hit = np.flatnonzero(np.isin(ids, np.array(list(relabel), dtype=np.uint64)))
        ids[hit] = [relabel[int(v)] for v in ids[hit].tolist()]
    return ids, np.array(ended, dtype=np.uint64), np.array(ended_ts, dtype=np.int64)


def _narrow(index: np.ndarray, bound: int) -> np.ndarray:
    """Positions below `bound` as int32 when they fit (numpy indexes with them without a copy)."""
    return index.astype(np.int32) if bound < 2**31 else index


def _in_sequence(order: np.ndarray, s: np.ndarray, number: np.ndarray, starts: np.ndarray,
                 sequenced: np.ndarray | None) -> np.ndarray:
    """Put each connection's positions in `order` (sorted by connection, recorded order
    inside; `number`: the connection of each position) in the kernel's order, by `s`, the
    seq of each position: an event that took the overflow path, or that the consumer passed
    on late, can be recorded after events of its connection that the kernel made later. seq
    wraps at 2**16: of two events of one connection, the later is a forward distance below
    half the range. Returns the positions moved (those of the connections sorted again).
    On a recording in order this costs a subtraction and a comparison over `s`."""
    if len(order) < 2:
        return np.zeros(0, np.int64)
    back = np.flatnonzero((s[1:] - s[:-1]).view(np.int16) < 0)  # uint16 arithmetic wraps
    back = back[number[back] == number[back + 1]]
    if sequenced is not None:
        ok = sequenced[order[back]] & sequenced[order[back + 1]]
        back = back[ok]
    if not len(back):
        return np.zeros(0, np.int64)
    segs = np.unique(number[back])
    ends = np.r_[starts[1:], len(order)]
    if sequenced is not None:  # a connection with rows without a number (adopted): recorded order
        whole = np.array([sequenced[order[starts[k]:ends[k]]].all() for k in segs.tolist()], dtype=bool)
        segs = segs[whole]
        if not len(segs):
            return np.zeros(0, np.int64)
    pos = np.concatenate([np.arange(starts[k], ends[k]) for k in segs.tolist()])
    seg_of = np.repeat(segs, ends[segs] - starts[segs])
    # each position's number unwrapped: the sum of the signed steps from its connection's
    # first (plus a constant per connection, which sorting by connection first makes harmless)
    sp = s[pos]
    unwrapped = np.cumsum(np.r_[0, (sp[1:] - sp[:-1]).view(np.int16).astype(np.int64)])
    order[pos] = order[pos[np.lexsort((unwrapped, seg_of))]]
    return pos


class ByConnection:
    """The state changes of a recording (kind STATE, not dropped by a kernel filter).

    In recorded order: `frame_rows` (table rows; the transitions frame's rows). Sorted by
    connection (rows with no id, 0, left out), per position: `old`, `new` (uint8),
    `number` (the connection's position in `ids`) and `order` (the position in `frame_rows`;
    `ts_frame` holds the times in recorded order). Per connection: `ids`, `starts`, `ends`.
    A connection's id is its generation, or for one the kernel's map had no entry for, the
    id `entryless_ids` gives (`all_ids`: every table row's id, None when none is needed);
    `entryless_ends`: such connections that ended without a CLOSE, (ids, times ns);
    `resequenced`: connections whose recorded order was not the kernel's (sorted by seq).
    """

    def __init__(self, cols):
        kind = cols["kind"]
        rows = np.flatnonzero(kind == EventKind.STATE)
        gen = cols.at("gen", rows, ascending=True)
        self.all_ids = None
        self.entryless_ends = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        if len(gen) and not gen.all() and (cols.at("skaddr", rows[gen == 0], ascending=True) != 0).any():
            self.all_ids, *ends = entryless_ids(cols)
            self.entryless_ends = tuple(ends)
            gen = self.all_ids[rows]
        sequenced = None  # rows whose seq counts (None: all): those without a map entry have none
        if self.all_ids is not None:
            sequenced = cols.at("gen", rows, ascending=True) != 0
        dropped = _dropped(cols, gen)
        if dropped is not None:
            rows, gen = rows[~dropped], gen[~dropped]
            sequenced = None if sequenced is None else sequenced[~dropped]
        self.frame_rows = rows = _narrow(rows, len(kind))  # any table row fits the type of these
        at = cols.gather(rows, ascending=True)
        # a second thread (numpy releases the GIL) reads the times and states, then puts the
        # states in sorted order, while this one sorts the ids and finds the segments
        with ThreadPoolExecutor(1) as pool:
            inframe = pool.submit(lambda: (at("ts_ns").view(np.int64), at("oldstate"), at("newstate"), at("seq")))
            self.at_frame_rows = at
            named = gen != 0
            base = np.uint64(gen[named].min()) if named.any() else np.uint64(0)
            if len(gen) and int(gen.max()) - int(base) < 2**32:  # ids of one recording: 32 bits do
                gen -= base
                gen = gen.astype(np.uint32)
            if named.all():
                order = np.argsort(gen, kind="stable")
            else:
                named = np.flatnonzero(named)
                order = named[np.argsort(gen[named], kind="stable")]
            del named
            order = _narrow(order, len(rows))
            c = gen[order]
            del gen
            brk = np.flatnonzero(c[1:] != c[:-1]) + 1 if len(c) else np.zeros(0, np.int64)
            self.starts = np.r_[0, brk] if len(c) else brk
            self.ends = np.r_[brk - 1, len(c) - 1] if len(c) else brk
            self.ts_frame, old, new, seq = inframe.result()
            moved = pool.submit(lambda: (old[order], new[order], seq[order]))
            self.ids = c[self.starts].astype(np.uint64) + (base if c.dtype == np.uint32 else np.uint64(0))
            del c, brk
            self.number = np.repeat(np.arange(len(self.ids), dtype=np.int32), self.ends - self.starts + 1)
            self.old, self.new, s = moved.result()
            moved = _in_sequence(order, s, self.number, self.starts, sequenced)
            if len(moved):  # (few): their states again, in the new order
                self.old[moved], self.new[moved] = old[order[moved]], new[order[moved]]
            self.resequenced = len(np.unique(self.number[moved]))
            self.order = order

    def ids_of(self, rows: np.ndarray, gen: np.ndarray) -> np.ndarray:
        """The connection ids of these table rows, whose generations are `gen`."""
        return gen if self.all_ids is None else self.all_ids[rows]

    def table_rows(self, positions: np.ndarray) -> np.ndarray:
        """The table rows at these sorted positions."""
        return self.frame_rows[self.order[positions]]

    def times(self, positions: np.ndarray) -> np.ndarray:
        """The times (ns) at these sorted positions."""
        return self.ts_frame[self.order[positions]]

    def sorted_column(self, name: str) -> np.ndarray:
        """A recording column's values at every sorted position."""
        return self.at_frame_rows(name)[self.order]

    def where(self, mask: np.ndarray, last: bool = False, idx: np.ndarray | None = None):
        """(connection positions, sorted positions) of each connection's first (or last)
        masked position (mask: over all positions, or over the positions `idx`)."""
        idx = np.flatnonzero(mask) if idx is None else idx[mask]
        c = self.number[idx]
        change = c[1:] != c[:-1]
        keep = (np.r_[change, True] if last else np.r_[True, change]) if len(c) else np.zeros(0, bool)
        return c[keep].astype(np.int64), idx[keep]

    def time_in_old(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted positions, ns) of the changes whose time in `old` is known: since the
        connection's previous change, which led to `old` (otherwise its start was not
        recorded, or events are missing)."""
        old, new, number = self.old, self.new, self.number
        pos = np.flatnonzero((number[1:] == number[:-1]) & (old[1:] == new[:-1])) + 1
        ts = self.ts_frame
        ns = ts[self.order[pos]]
        ns -= ts[self.order[pos - 1]]
        return pos, ns
