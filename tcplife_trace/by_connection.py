"""A recording's state changes sorted by connection: one sort shared by every frame.

The transitions frame (time in the old state), the lifecycles frame (first/last/any per
connection) and the state durations all need each connection's rows together and in
recorded order. They are sorted once here (a stable sort, so recorded order is kept inside
each connection); each frame then works on contiguous segments. Arrays are kept narrow
(states as uint8, segment numbers as int32): on a large recording fresh memory is what
costs most.
"""
from __future__ import annotations

import numpy as np

from .probes.event_layout import EventKind


def _dropped(cols, gen: np.ndarray) -> np.ndarray | None:
    """Which of these rows (their connection ids) belong to connections that a kernel filter
    (-p/-L/-D/-4/-6) dropped part way: the live tracer forgets them, and so do the frames.
    None when the recording has no such connection."""
    fr = np.flatnonzero(cols["kind"] == EventKind.FILTERED)
    filtered = cols.at("gen", fr, ascending=True) if len(fr) else fr
    filtered = filtered[filtered != 0]
    return np.isin(gen, filtered) if len(filtered) else None


def _narrow(index: np.ndarray) -> np.ndarray:
    """Row numbers as int32 when they fit (numpy indexes with them without a copy)."""
    return index.astype(np.int32) if len(index) and index.max() < 2**31 else index


class ByConnection:
    """The state changes of a recording (kind STATE, not dropped by a kernel filter).

    In recorded order: `frame_rows` (table rows; the transitions frame's rows). Sorted by
    connection (ids without a generation, 0, left out), per position: `rows` (table row),
    `old`, `new` (uint8), `ts` (ns), `number` (the connection's position in `ids`), and
    `order` (the position in `frame_rows`). Per connection: `ids`, `starts`, `ends`.
    """

    def __init__(self, cols):
        rows = np.flatnonzero(cols["kind"] == EventKind.STATE)
        gen = cols.at("gen", rows, ascending=True)
        dropped = _dropped(cols, gen)
        if dropped is not None:
            rows, gen = rows[~dropped], gen[~dropped]
        self.frame_rows = rows = _narrow(rows)
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
        order = _narrow(order)
        c = gen[order]
        del gen
        brk = np.flatnonzero(c[1:] != c[:-1]) + 1 if len(c) else np.zeros(0, np.int64)
        self.starts = np.r_[0, brk] if len(c) else brk
        self.ends = np.r_[brk - 1, len(c) - 1] if len(c) else brk
        self.ids = c[self.starts].astype(np.uint64) + (base if c.dtype == np.uint32 else np.uint64(0))
        del c, brk
        self.order = order
        self.rows = rows[order]
        at = cols.gather(rows, ascending=True)
        self.ts = at("ts_ns").view(np.int64)[order]
        self.old = at("oldstate")[order]
        self.new = at("newstate")[order]
        self.number = np.repeat(np.arange(len(self.ids), dtype=np.int32), self.ends - self.starts + 1)

    def where(self, mask: np.ndarray, last: bool = False, idx: np.ndarray | None = None):
        """(connection positions, sorted positions) of each connection's first (or last)
        masked position (mask: over all positions, or over the positions `idx`)."""
        idx = np.flatnonzero(mask) if idx is None else idx[mask]
        c = self.number[idx]
        change = c[1:] != c[:-1]
        keep = (np.r_[change, True] if last else np.r_[True, change]) if len(c) else np.zeros(0, bool)
        return c[keep].astype(np.int64), idx[keep]

    def time_in_old(self) -> np.ndarray:
        """Per position, ns spent in `old`: since the connection's previous change if that
        led to `old` (-1 otherwise: its start was not recorded, or events are missing)."""
        ts, old, new = self.ts, self.old, self.new
        out = np.full(len(ts), -1, dtype=np.int64)
        if len(ts) > 1:
            ok = (self.number[1:] == self.number[:-1]) & (old[1:] == new[:-1])
            np.subtract(ts[1:], ts[:-1], out=out[1:], where=ok)
        return out
