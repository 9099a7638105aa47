"""The kernel's events as one ordered stream, plus the kernel's own counters.

Most events come through the ring buffer, in global order. The few the ring
refused arrive through the per-CPU overflow perf buffer, late; so the newest
HOLDBACK_NS of ring events are held back and any overflow events are merged
into them by timestamp before anything reaches the state machine.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np

from .decode import Ev, event_tuples, life_tuples
from .event_layout import (EVENT_DTYPE, EVENT_SIZE, LIFE_DTYPE, LIFE_SIZE, N_KINDS, STAT_DROPPED,
                           STAT_EMITTED, STAT_MAP_FULL, STAT_SPILLED, EventKind, Flag)
from .program import LoadedProgram
from .ringbuf import RingBufferReader

HOLDBACK_NS = 20_000_000  # event time a spilled event may lag the ring events around it
PACE_S = 0.01     # reads at most this often...
PACE_FILL = 0.25  # ...while both rings are less full than this
KIND_NAMES = {k.value: k.name.lower() for k in EventKind}
_LIFE = int(EventKind.LIFE)
_ERROR = int(EventKind.ERROR)
_BIRTH_UNSEEN = int(Flag.BIRTH_UNSEEN)
_NO_EVENTS = np.empty(0, dtype=EVENT_DTYPE)
_NO_LIVES = np.empty(0, dtype=LIFE_DTYPE)
# Records are moved (concatenated, inserted, taken) as opaque bytes: numpy copies a structured
# array field by field, 30 times slower than the same bytes (and its promotion would pack
# struct tlt_agg's padding away)
_RAW = {EVENT_DTYPE: np.dtype((np.void, EVENT_SIZE)), LIFE_DTYPE: np.dtype((np.void, LIFE_SIZE))}


def _cat(*arrays: np.ndarray) -> np.ndarray:
    """Record arrays of one dtype end to end, copied as bytes."""
    raw = _RAW[arrays[0].dtype]
    return np.concatenate([a.view(raw) for a in arrays]).view(arrays[0].dtype)


def _take(a: np.ndarray, index) -> np.ndarray:
    """a[index] (a boolean mask or positions), copied as bytes (a mask as positions: numpy
    selects records of this size by a mask 6 times slower than by positions)."""
    index = np.asarray(index)
    if index.dtype == bool:
        index = np.flatnonzero(index)
    return a.view(_RAW[a.dtype])[index].view(a.dtype)


def _split(a: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a[first], a[~first]): views when the rows in `first` are a prefix (records of a ring
    come nearly in time order, so a time cut usually is one), else copies."""
    k = int(np.argmin(first)) if not first.all() else len(first)
    if not first[k:].any():
        return a[:k], a[k:]
    return _take(a, first), _take(a, ~first)


def _pairs(keys_e: np.ndarray, keys_l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event positions, record positions) of every pair with equal keys: the events of each
    LIFE record's connection. Keys in a narrow range (generations: a counter) are looked up
    in a table by key; others in the records' sorted keys (a batch's records are few beside
    its events), every pair when several records share a key."""
    if not len(keys_l) or not len(keys_e):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    low, high = int(keys_l.min()), int(keys_l.max())
    if high - low < 4 * (len(keys_e) + len(keys_l)):
        table = np.full(high - low + 1, -1, dtype=np.int64)
        table[keys_l - low] = np.arange(len(keys_l))
        if np.count_nonzero(table >= 0) == len(keys_l):  # distinct keys
            e = np.flatnonzero((keys_e >= low) & (keys_e <= high))
            j = table[keys_e[e] - low]
            hit = j >= 0
            return e[hit], j[hit]
    order = np.argsort(keys_l, kind="stable")
    s = keys_l[order]
    first = np.searchsorted(s, keys_e, side="left")
    if not (s[1:] == s[:-1]).any():  # distinct keys
        hit = np.flatnonzero(s[np.minimum(first, len(s) - 1)] == keys_e)
        return hit, order[first[hit]]
    cnt = np.searchsorted(s, keys_e, side="right") - first
    hit = np.flatnonzero(cnt)
    c = cnt[hit]
    start = np.repeat(first[hit] - (np.cumsum(c) - c), c)
    return np.repeat(hit, c), order[start + np.arange(int(c.sum()))]


def _same_gen(gens: np.ndarray, lives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_pairs of events (their `gen` column) and LIFE records of one connection: one
    generation (unique per tracer run; never 0 on a LIFE record, 0 on an event: none)."""
    rgen = lives["ev"]["gen"]
    e, l_ = _pairs(gens, rgen)
    if len(e) and not rgen.all():
        keep = rgen[l_] != 0
        e, l_ = e[keep], l_[keep]
    return e, l_


def _records(blob, dtype: np.dtype) -> np.ndarray:
    """Records of one size from the ring's bytes (or a uint8 array of its own, as
    RingBufferReader.read_array gives it): a writable array of their own."""
    if isinstance(blob, np.ndarray):
        return blob.reshape(-1).view(dtype)
    return np.frombuffer(bytearray(blob), dtype=dtype)


class Batch:
    """What one poll released: `events` (EVENT_DTYPE, in the kernel's order, spilled events
    merged back in) and `lives` (LIFE_DTYPE: the folded records of connections that ended,
    in no particular order). Both arrays are the callers' own (no buffer is shared)."""
    __slots__ = ("events", "lives")

    def __init__(self, events: np.ndarray = _NO_EVENTS, lives: np.ndarray = _NO_LIVES):
        self.events = events
        self.lives = lives

    def __len__(self) -> int:
        return len(self.events) + len(self.lives)

    def tuples(self, lives: bool = True) -> list:
        """The batch as `Ev`-ordered tuples (LIFE records as decode_life_batch's tuples), each
        LIFE record after the events of its time (a connection's record follows its CLOSE)
        and before its own connection's later events (the errno report, a reset or a read
        after the CLOSE), wherever another connection's older event is; lives=False: the
        events alone."""
        evs = event_tuples(self.events)
        if not lives or not len(self.lives):
            return evs
        recs = self.lives
        rts = recs["ev"]["ts_ns"]
        # the events are in ring order, their times only nearly sorted (a spilled event merged
        # back, or another CPU's, may be older than the one before it): a record goes after the
        # LAST event of its time or before, found in the times' running minimum from the end
        # (sorted, and above the record's time exactly from that event on) ...
        ets = self.events["ts_ns"]
        at = np.zeros(len(recs), dtype=np.int64)
        if len(ets):
            at = np.searchsorted(np.minimum.accumulate(ets[::-1])[::-1], rts, side="right")
            # ... but never after the first event of its own connection later than it, which
            # the consumer joins to the closed lifecycle (an older event of another connection
            # after that one would otherwise take the record past it). Only a record with an
            # event later than it before that place (from the first whose running maximum is
            # above its time) has one to look for: in a ring's order, few
            start = np.searchsorted(np.maximum.accumulate(ets), rts, side="right")
            some = np.flatnonzero(start < at)
            if len(some):
                lo, hi = int(start[some].min()), int(at[some].max())
                e, l_ = _own_later(self.events, np.arange(lo, hi), _take(recs, some))
                if len(e):
                    first = np.full(len(some), len(ets), dtype=np.int64)
                    np.minimum.at(first, l_, e)
                    at[some] = np.minimum(at[some], first)
        order = np.lexsort((rts, at))
        at = at[order].tolist()
        out, prev = [], 0
        for pos, rec in zip(at, life_tuples(_take(recs, order))):
            out += evs[prev:pos]
            out.append(rec)
            prev = pos
        out += evs[prev:]
        return out


def _own_later(events: np.ndarray, late: np.ndarray, lives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event positions, record positions): of the events at positions `late`, those of each
    LIFE record's own connection later than it. Its own: the same generation, or an errno
    report the kernel could not tie to a socket (no generation) with the record's ports
    (Tracker._error joins it by them)."""
    gen = events["gen"][late]
    e, l_ = _same_gen(gen, lives)
    errs = np.flatnonzero((events["kind"][late] == _ERROR) & (gen == 0))
    if len(errs):
        def ports(a):
            return a["sport"].astype(np.int64) << 16 | a["dport"].astype(np.int64)
        pe, pl = _pairs(ports(events[late[errs]]), ports(lives["ev"]))
        e, l_ = np.concatenate((e, errs[pe])), np.concatenate((l_, pl))
    e = late[e]
    later = events["ts_ns"][e] > lives["ev"]["ts_ns"][l_]
    return e[later], l_[later]


def split_records(blob: bytes, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring or overflow records of one size as (events, lives): records of struct tlt_life's
    size that are not LIFE records are events padded to that size (the aggregated modes of
    the one-ring layout)."""
    if size == EVENT_SIZE:
        return _records(blob, EVENT_DTYPE), _NO_LIVES
    recs = _records(blob, LIFE_DTYPE)
    is_life = recs["ev"]["kind"] == _LIFE
    if is_life.all():
        return _NO_EVENTS, recs
    events = np.ascontiguousarray(recs.view(np.uint8).reshape(len(recs), LIFE_SIZE)[~is_life, :EVENT_SIZE])
    return events.view(EVENT_DTYPE).reshape(-1), _take(recs, is_life)


class OrderedMerge:
    """Ring events in ring order, with late overflow events put back where they belong.

    A spilled event waits until the ring has been read past its time (so the events of
    its connection before it have arrived), then goes just before the first held event
    of the same connection with a higher sequence number. The newest holdback_ns of
    ring events are held back so a spilled event can still find its place. LIFE records
    are released by the same time cut, in any order, each no earlier than its own
    connection's events of its time (_own_order), and no later than its connection's
    events after it (the errno report the kernel sends after the CLOSE): another
    connection's older event held across the cut holds back neither.

    Only the events ring's records move progress(): the lives ring is read separately and
    may be further on (or behind) than the events; lives_ts is how far it has been read, for
    the caller to take the lesser of the two while the lives ring still has records waiting.
    """

    def __init__(self, holdback_ns: int = HOLDBACK_NS):
        self.holdback_ns = holdback_ns
        # the held records as the chunks they were read in, each with its times' (min, max):
        # a poll releases whole chunks and cuts one, so each record is copied once on its way
        # out, not once per poll while it waits (a busy consumer polls small batches)
        self._held: list[list] = []   # [events, min ts, max ts], in ring order
        self._lives: list[list] = []  # [lives, min ts, max ts]
        self.waiting = _NO_EVENTS  # spilled events, by time (arrival order among equals)
        self.released_ts = 0
        self.ring_ts = 0  # time of the newest event read from the events ring
        self.lives_ts = 0  # time of the last LIFE record read from the lives ring
        self.late = 0  # spilled events whose connection had already moved on

    @staticmethod
    def _chunk(recs: np.ndarray, ts: np.ndarray) -> list:
        return [recs, int(ts.min()), int(ts.max())]

    @staticmethod
    def _joined(chunks: list[list], empty: np.ndarray) -> np.ndarray:
        if not chunks:
            return empty
        return chunks[0][0] if len(chunks) == 1 else _cat(*(c[0] for c in chunks))

    @property
    def held(self) -> np.ndarray:
        """The ring events held back, in ring order (one array)."""
        return self._joined(self._held, _NO_EVENTS)

    @property
    def lives(self) -> np.ndarray:
        """The LIFE records held back (one array)."""
        return self._joined(self._lives, _NO_LIVES)

    def add_ring(self, events: np.ndarray, lives: np.ndarray = _NO_LIVES) -> None:
        if len(events):
            self._held.append(self._chunk(events, events["ts_ns"]))
            self.ring_ts = max(self.ring_ts, int(events["ts_ns"][-1]))
        if len(lives):
            self._lives.append(self._chunk(lives, lives["ev"]["ts_ns"]))
            self.lives_ts = max(self.lives_ts, int(lives["ev"]["ts_ns"][-1]))

    def add_spilled(self, events: np.ndarray, lives: np.ndarray = _NO_LIVES) -> None:
        if len(events):
            w = _cat(self.waiting, events) if len(self.waiting) else events
            self.waiting = _take(w, np.argsort(w["ts_ns"], kind="stable"))
        if len(lives):
            self._lives.append(self._chunk(lives, lives["ev"]["ts_ns"]))

    def progress(self) -> int:
        """Time up to which the events ring has been read (its newest event, or the last
        released). A LIFE record never moves it: the lives ring being further on says
        nothing of events still waiting in the events ring."""
        return max(self.ring_ts, self.released_ts)

    def release(self, progress: int, final: bool = False) -> Batch:
        waiting = self.waiting
        if len(waiting) and (final or int(waiting["ts_ns"][0]) <= progress):
            n = len(waiting) if final else int(np.searchsorted(waiting["ts_ns"], progress, side="right"))
            ready, self.waiting = waiting[:n], waiting[n:]
            held = self._placed(self.held, ready)
            self._held = [self._chunk(held, held["ts_ns"])] if len(held) else []
        if final:
            out, out_lives = self.held, self.lives
            self._held, self._lives = [], []
        else:
            cut_ts = max(progress - self.holdback_ns, 0)
            out = self._events_before(cut_ts)
            out_lives = self._lives_before(cut_ts)
            if len(out_lives) and self._held:
                out, out_lives = self._own_order(out, out_lives)
        if len(out):
            self.released_ts = max(self.released_ts, int(out["ts_ns"][-64:].max()))
        return Batch(out, out_lives)

    def _own_order(self, out: np.ndarray, lives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The LIFE records before the cut that leave now, and the events that leave with them.
        A record waits while an event of its own connection at or before its time is still held
        (its CLOSE, in a chunk across the cut; the start of a socket born while the map was
        full: no generation, the same address), not for any other connection's: waiting for
        those held a record a batch past its own errno report. An event of a connection whose
        record waits, later than that record, waits with it (at the head of the held events)."""
        held_ts = min(c[1] for c in self._held)
        rts = lives["ev"]["ts_ns"]
        maybe = np.flatnonzero(rts >= held_ts)  # (none held at or before the others' times)
        if not len(maybe):
            return out, lives
        cand = _take(lives, maybe)
        cts = cand["ev"]["ts_ns"]
        top = int(cts.max())
        wait = np.zeros(len(cand), dtype=bool)
        unseen = np.flatnonzero((cand["ev"]["flags"] & _BIRTH_UNSEEN) != 0)
        for c in self._held:
            if c[1] > top:
                continue
            recs = c[0]
            ts = recs["ts_ns"]
            near = np.flatnonzero(ts <= top) if c[2] > top else None  # (the events that may be)
            gens = recs["gen"] if near is None else recs["gen"][near]
            e, l_ = _same_gen(gens, cand)
            if near is not None:
                e = near[e]
            wait[l_[ts[e] <= cts[l_]]] = True
            if len(unseen):  # its entry-less start (Tracker._adopt: by address)
                entryless = np.flatnonzero(recs["gen"] == 0)
                e, l_ = _pairs(recs["skaddr"][entryless], cand["ev"]["skaddr"][unseen])
                e, l_ = entryless[e], unseen[l_]
                wait[l_[ts[e] <= cts[l_]]] = True
        if not wait.any():
            return out, lives
        back = _take(cand, wait)
        self._lives.append(self._chunk(back, back["ev"]["ts_ns"]))
        keep = np.ones(len(lives), dtype=bool)
        keep[maybe[wait]] = False
        lives = _take(lives, keep)
        if len(out):
            e, l_ = _same_gen(out["gen"], back)
            e = e[out["ts_ns"][e] > back["ev"]["ts_ns"][l_]]
            if len(e):
                stay = np.zeros(len(out), dtype=bool)
                stay[e] = True
                later = _take(out, stay)
                self._held.insert(0, self._chunk(later, later["ts_ns"]))
                out = _take(out, ~stay)
        return out, lives

    def _events_before(self, cut_ts: int) -> np.ndarray:
        """Held events before the cut, in ring order: the whole chunks all before it; or, when
        there is none, the first chunk up to its first event at or past the cut. A chunk
        across the cut waits for the next release when whole chunks go (the held events are
        then a suffix of the ring, but for the events _own_order keeps back with their
        connection's LIFE record, and a release most often one chunk as it was read, not a
        copy of two joined)."""
        chunks, n = self._held, 0
        parts = []
        while n < len(chunks) and chunks[n][2] < cut_ts:
            parts.append(chunks[n])
            n += 1
        if n == 0 and chunks and chunks[0][1] < cut_ts:
            recs = chunks[n][0]
            late = recs["ts_ns"] >= cut_ts
            k = int(np.argmax(late)) if late.any() else len(recs)  # the prefix before the first at the cut
            if k:
                parts.append([recs[:k]])
                rest = chunks[n][0] = recs[k:]
                if len(rest):  # (its oldest, for the LIFE records' cut)
                    chunks[n][1] = int(rest["ts_ns"].min())
                else:
                    n = 1
        del chunks[:n]
        return self._joined(parts, _NO_EVENTS)

    def _lives_before(self, cut_ts: int) -> np.ndarray:
        """Every held LIFE record before the cut, wherever it is held."""
        parts, keep = [], []
        for c in self._lives:
            if c[2] < cut_ts:
                parts.append(c)
            elif c[1] < cut_ts:
                before, rest = _split(c[0], c[0]["ev"]["ts_ns"] < cut_ts)
                parts.append([before])
                keep.append(self._chunk(rest, rest["ev"]["ts_ns"]))
            else:
                keep.append(c)
        self._lives = keep
        return self._joined(parts, _NO_LIVES)

    def _placed(self, held: np.ndarray, ready: np.ndarray) -> np.ndarray:
        """held with the ready spilled events put in place, in one pass over held (a backlog
        can hold a whole ring of events, and spills come in bursts when it does)."""
        n = len(held)
        gens = ready["gen"]
        want = np.unique(gens[gens != 0])
        where: dict[int, list] = {}
        if n and len(want):
            idx = np.nonzero(np.isin(held["gen"], want))[0]
            for i, g, q in zip(idx.tolist(), held["gen"][idx].tolist(), held["seq"][idx].tolist()):
                where.setdefault(g, []).append((i, q))
        positions = []
        released = self.released_ts
        for gen, seq, ts in zip(gens.tolist(), ready["seq"].tolist(), ready["ts_ns"].tolist()):
            pos = n
            for i, q in where.get(gen, ()):
                # seq wraps at 2**16: "later" is a forward distance below half the range
                if 0 < (q - seq) % 65536 < 32768:
                    pos = i
                    break
            if pos == n and ts < released:
                self.late += 1
            positions.append(pos)
        pos_arr = np.asarray(positions, dtype=np.int64)
        order = np.argsort(pos_arr, kind="stable")
        raw = _RAW[EVENT_DTYPE]
        return np.insert(held.view(raw), pos_arr[order], _take(ready, order).view(raw)).view(EVENT_DTYPE)


class EventStream:
    """The program's records as Batches (poll_batch, drain_batch, finish_batch), or as
    `Ev`-ordered tuples derived from them (poll, drain, finish). Two ring buffers: "events"
    (struct tlt_event) and "lives" (struct tlt_life); the overflow perf buffer carries both.
    In mode "stream" the tuples are the events alone (what that mode sent before the kernel
    folded in it too: its consumers build lifecycles from the events); the batches always
    hold the LIFE records as well."""

    def __init__(self, program: LoadedProgram, holdback_ns: int = HOLDBACK_NS):
        self.program = program
        fd, size = program.ring_buffer()
        self.record_size = program.source.record_size
        self.reader = RingBufferReader(fd, size, EVENT_SIZE)
        lfd, lsize = program.lives_ring()
        self.lives_reader = RingBufferReader(lfd, lsize, LIFE_SIZE)
        self.reader.watch(lfd)
        self.tuple_lives = program.source.mode != "stream"
        self.merge = OrderedMerge(holdback_ns)
        self.pace_s = PACE_S
        self._last_read = 0.0
        self._read_full = False
        # perf's own count of the records the overflow buffer refused: the same drops the
        # kernel side counts per kind (STAT_DROPPED), reported late and without a kind, so
        # a cross-check, never added to the losses
        self.overflow_lost = 0
        self.received = np.zeros(N_KINDS, dtype=np.int64)  # records read, by kind, both buffers
        self._overflow_lost: list[int] = []
        self._spilled: list[bytes] = []  # records of EVENT_SIZE or LIFE_SIZE, told by size
        spilled = self._spilled

        def on_overflow(_cpu, data, size):
            # perf pads a raw sample: its size is at least the record's, never a LIFE's if an event
            spilled.append(ctypes.string_at(data, LIFE_SIZE if size >= LIFE_SIZE else EVENT_SIZE))
            return 0

        def on_overflow_lost(count):
            self._overflow_lost.append(count)
        self._callbacks = (on_overflow, on_overflow_lost)  # keep the ctypes callbacks alive
        program.open_overflow(on_overflow, on_overflow_lost)

    def _count(self, events: np.ndarray, lives: np.ndarray) -> None:
        if len(events):
            self.received += np.bincount(events["kind"], minlength=N_KINDS)[:N_KINDS]
        if len(lives):
            self.received[_LIFE] += len(lives)

    def _split_spilled(self) -> tuple[np.ndarray, np.ndarray]:
        evs = [r for r in self._spilled if len(r) == EVENT_SIZE]
        lifes = [r for r in self._spilled if len(r) != EVENT_SIZE]
        self._spilled.clear()
        events, lives = split_records(b"".join(evs), EVENT_SIZE) if evs else (_NO_EVENTS, _NO_LIVES)
        if lifes:
            more, lives = split_records(b"".join(lifes), LIFE_SIZE)
            if len(more):
                events = _cat(events, more) if len(events) else more
        return events, lives

    @property
    def late_overflow(self) -> int:
        return self.merge.late

    @property
    def discarded(self) -> int:
        """Records both ring readers stepped over (discarded or not ours): the loss counters'
        ring_discarded."""
        return self.reader.discarded + self.lives_reader.discarded

    def ring_fill(self) -> float:
        """The fuller of the two rings now (share of its size waiting, 1: full)."""
        return max(r.fill() for r in (self.reader, self.lives_reader))

    @property
    def peak_fill(self) -> float:
        """The largest share of either ring ever seen waiting (1: full, records are lost)."""
        return max(r.peak_fill / r.data_size for r in (self.reader, self.lives_reader))

    def _read_ring(self) -> bool:
        # lives first: a LIFE record is sent after its connection's last event, so the events
        # read next are at least as far on (the time cut releases a record with its events)
        lblob = self.lives_reader.read_array()
        blob = self.reader.read_array()
        # a read that took all it may (max_batch) left more waiting: the next is not paced
        self._read_full = len(blob) >= self.reader.max_batch or len(lblob) >= self.lives_reader.max_batch
        if not len(blob) and not len(lblob):
            return False
        events = split_records(blob, EVENT_SIZE)[0] if len(blob) else _NO_EVENTS
        lives = split_records(lblob, LIFE_SIZE)[1] if len(lblob) else _NO_LIVES
        self._count(events, lives)
        self.merge.add_ring(events, lives)
        return True

    def _release(self, final: bool) -> Batch:
        self.program.poll_overflow()
        if self._overflow_lost:
            self.overflow_lost += sum(self._overflow_lost)
            self._overflow_lost.clear()
        if self._spilled:
            events, lives = self._split_spilled()
            self._count(events, lives)
            self.merge.add_spilled(events, lives)
        return self.merge.release(self._progress(final), final)

    def _progress(self, final: bool) -> int:
        """How far both rings have been read: the events ring's newest event (now once it is
        empty), and no further than the lives ring's last record while that one still has
        records waiting (so a LIFE record never leaves after a later event of its time)."""
        progress = self.merge.progress()
        if final or not self.reader.pending():
            progress = max(progress, time.monotonic_ns())
        if not final and self.lives_reader.pending():
            progress = min(progress, self.merge.lives_ts)
        return progress

    def poll_batch(self, timeout_ms: int) -> Batch:
        """The next records, waiting up to timeout_ms (one ring read: up to the reader's
        max_batch records). Reads are paced PACE_S apart while the rings are less than
        PACE_FILL full: each poll has a fixed cost, and a consumer that read whatever had
        just arrived would spend it on a handful of records at a time, all its CPU at any
        rate; paced, a busy second is read in ~100 batches of thousands."""
        now = time.monotonic()
        wait = self._last_read + self.pace_s - now
        if wait > 0 and timeout_ms > 0 and not self._read_full and self.ring_fill() < PACE_FILL:
            time.sleep(min(wait, timeout_ms / 1000))
            timeout_ms = max(0, timeout_ms - int((time.monotonic() - now) * 1000))  # (timeout_ms in all)
        if not self.lives_reader.pending():
            self.reader.wait(timeout_ms)
        self._last_read = time.monotonic()
        self._read_ring()
        return self._release(final=False)

    def drain_batch(self) -> Batch:
        """Everything still buffered, without waiting."""
        while self._read_ring():
            pass
        return self._release(final=True)

    def finish_batch(self) -> Batch:
        """Detach the program, then everything it sent: after this the kernel's counters
        are final and every record they count is either here or lost."""
        self.program.detach()
        return self.drain_batch()

    def poll(self, timeout_ms: int) -> list:
        """The next events in order (as `Ev`-ordered tuples), waiting up to timeout_ms."""
        return self.poll_batch(timeout_ms).tuples(self.tuple_lives)

    def drain(self) -> list:
        return self.drain_batch().tuples(self.tuple_lives)

    def finish(self) -> list:
        return self.finish_batch().tuples(self.tuple_lives)

    def close(self) -> None:
        self.reader.close()
        self.lives_reader.close()

    def received_by_kind(self) -> dict:
        return {name: int(self.received[k]) for k, name in KIND_NAMES.items()}

    def kernel_counts(self) -> dict:
        """Per kind: events the programs tried to send ("emitted"), sent through the overflow
        buffer ("spilled"), refused by both buffers ("lost"); map overflows; and per attached
        tracepoint the hits whose program never ran ("recursion", None if not counted here)."""
        raw = self.program.stats()

        def per_kind(base: int) -> dict:
            return {name: raw[base + k] for k, name in KIND_NAMES.items()}
        return {"emitted": per_kind(STAT_EMITTED), "lost": per_kind(STAT_DROPPED),
                "spilled": per_kind(STAT_SPILLED), "map_full": raw[STAT_MAP_FULL],
                "recursion": self.program.recursion_misses()}


__all__ = ["Batch", "EventStream", "Ev", "OrderedMerge"]
