"""The kernel's events as one ordered stream, plus the kernel's own counters.

Most events come through the ring buffer, in global order. The few the ring
refused arrive through the per-CPU overflow perf buffer, late; so the newest
HOLDBACK_NS of ring events are held back and any overflow events are merged
into them by timestamp before anything reaches the state machine.
"""
from __future__ import annotations

import bisect
import ctypes
import heapq
import itertools
import time

import numpy as np

from .decode import Ev, decode_batch, decode_life_batch
from .event_layout import (EVENT_SIZE, N_KINDS, STAT_DROPPED, STAT_EMITTED, STAT_MAP_FULL,
                           STAT_SPILLED, Event, EventKind)
from .program import LoadedProgram
from .ringbuf import RingBufferReader

HOLDBACK_NS = 20_000_000  # event time a spilled event may lag the ring events around it
KIND_NAMES = {k.value: k.name.lower() for k in EventKind}
_KIND_OFF = Event.kind.offset


def _ts(ev) -> int:
    return ev[0]


class OrderedMerge:
    """Ring events in ring order, with late overflow events put back where they belong.

    A spilled event waits until the ring has been read past its time (so the events of
    its connection before it have arrived), then goes just before the first held event
    of the same connection with a higher sequence number. The newest holdback_ns of
    ring events are held back so a spilled event can still find its place.
    """

    def __init__(self, holdback_ns: int = HOLDBACK_NS):
        self.holdback_ns = holdback_ns
        self.held: list = []
        self.waiting: list = []  # heap of (ts, arrival, event): a backlog can hold many
        self._arrival = itertools.count()
        self.released_ts = 0
        self.late = 0  # spilled events whose connection had already moved on

    def add_ring(self, batch: list) -> None:
        self.held += batch

    def add_spilled(self, events: list) -> None:
        for ev in events:
            heapq.heappush(self.waiting, (ev[0], next(self._arrival), ev))

    def progress(self) -> int:
        """Time up to which the ring has been read (its last event held, or released)."""
        return self.held[-1][0] if self.held else self.released_ts

    def release(self, progress: int, final: bool = False) -> list:
        held = self.held
        waiting = self.waiting
        if waiting and (final or waiting[0][0] <= progress):
            ready = []
            while waiting and (final or waiting[0][0] <= progress):
                ready.append(heapq.heappop(waiting)[2])
            held = self.held = self._placed(held, ready)
        if final:
            out, self.held = held, []
        else:
            cut = bisect.bisect_left(held, progress - self.holdback_ns, key=_ts)
            if cut == 0:
                return []
            out, self.held = held[:cut], held[cut:]
        if out:
            self.released_ts = max(self.released_ts, max(map(_ts, out[-64:])))
        return out

    def _placed(self, held: list, ready: list) -> list:
        """held with the ready spilled events put in place, in one pass over held (a backlog
        can hold a whole ring of events, and spills come in bursts when it does)."""
        want = {ev[2] for ev in ready if ev[2]}
        where: dict[int, list[int]] = {}
        if want:
            for i, other in enumerate(held):
                if other[2] in want:
                    where.setdefault(other[2], []).append(i)
        n = len(held)
        inserts = []
        for k, ev in enumerate(ready):
            gen, seq, pos = ev[2], ev[20], n
            for i in where.get(gen, ()):
                # seq wraps at 2**16: "later" is a forward distance below half the range
                if 0 < (held[i][20] - seq) % 65536 < 32768:
                    pos = i
                    break
            if pos == n and ev[0] < self.released_ts:
                self.late += 1
            inserts.append((pos, k, ev))
        inserts.sort(key=lambda t: (t[0], t[1]))
        out, prev = [], 0
        for pos, _k, ev in inserts:
            out += held[prev:pos]
            out.append(ev)
            prev = pos
        out += held[prev:]
        return out


class EventStream:
    def __init__(self, program: LoadedProgram, holdback_ns: int = HOLDBACK_NS):
        self.program = program
        fd, size = program.ring_buffer()
        self.record_size = size_ = program.source.record_size
        self.reader = RingBufferReader(fd, size, size_)
        self.decode = decode_batch if size_ == EVENT_SIZE else decode_life_batch
        self.merge = OrderedMerge(holdback_ns)
        # perf's own count of the records the overflow buffer refused: the same drops the
        # kernel side counts per kind (STAT_DROPPED), reported late and without a kind, so
        # a cross-check, never added to the losses
        self.overflow_lost = 0
        self.received = np.zeros(N_KINDS, dtype=np.int64)  # records read, by kind, both buffers
        self._overflow_lost: list[int] = []
        self._spilled: list[bytes] = []
        spilled = self._spilled

        def on_overflow(_cpu, data, _size):
            spilled.append(ctypes.string_at(data, size_))
            return 0

        def on_overflow_lost(count):
            self._overflow_lost.append(count)
        self._callbacks = (on_overflow, on_overflow_lost)  # keep the ctypes callbacks alive
        program.open_overflow(on_overflow, on_overflow_lost)

    def _count(self, blob: bytes) -> None:
        kinds = np.frombuffer(blob, dtype=np.uint8)[_KIND_OFF::self.record_size]
        self.received += np.bincount(kinds, minlength=N_KINDS)[:N_KINDS]

    @property
    def late_overflow(self) -> int:
        return self.merge.late

    def _release(self, final: bool) -> list:
        self.program.poll_overflow()
        if self._overflow_lost:
            self.overflow_lost += sum(self._overflow_lost)
            self._overflow_lost.clear()
        if self._spilled:
            blob = b"".join(self._spilled)
            self._count(blob)
            self.merge.add_spilled(self.decode(blob))
            self._spilled.clear()
        progress = self.merge.progress()
        if final or not self.reader.pending():
            progress = max(progress, time.monotonic_ns())
        return self.merge.release(progress, final)

    def poll(self, timeout_ms: int) -> list:
        """The next events in order (as `Ev`-ordered tuples), waiting up to timeout_ms."""
        self.reader.wait(timeout_ms)
        blob = self.reader.read()
        if blob:
            self._count(blob)
            self.merge.add_ring(self.decode(blob))
        return self._release(final=False)

    def drain(self) -> list:
        """Everything still buffered, without waiting."""
        while True:
            blob = self.reader.read()
            if not blob:
                break
            self._count(blob)
            self.merge.add_ring(self.decode(blob))
        return self._release(final=True)

    def finish(self) -> list:
        """Detach the program, then everything it sent: after this the kernel's counters
        are final and every event they count is either here or lost."""
        self.program.detach()
        return self.drain()

    def close(self) -> None:
        self.reader.close()

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


__all__ = ["EventStream", "Ev"]
