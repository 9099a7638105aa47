"""The ring buffer as a stream of decoded events, plus the kernel's own counters."""
from __future__ import annotations

import ctypes

from .decode import Ev, decode_many
from .event_layout import EVENT_SIZE, N_KINDS, STAT_DROPPED, STAT_EMITTED, STAT_MAP_FULL, EventKind
from .program import LoadedProgram

_string_at = ctypes.string_at


class EventStream:
    def __init__(self, program: LoadedProgram):
        self.program = program
        self._chunks: list[bytes] = []
        append = self._chunks.append

        def on_event(_ctx, data, _size):
            append(_string_at(data, EVENT_SIZE))
            return 0  # anything else sends bcc through a slow exception path
        self._on_event = on_event  # keep a reference: bcc holds only the ctypes wrapper
        program.open_ring_buffer(on_event)

    def _take(self) -> list[Ev]:
        chunks = self._chunks[:]
        del self._chunks[:]
        return decode_many(chunks)

    def poll(self, timeout_ms: int) -> list[Ev]:
        """Events that arrive within timeout_ms (all that are ready, at once)."""
        self.program.poll(timeout_ms)
        return self._take()

    def drain(self) -> list[Ev]:
        """Everything still in the buffer, without waiting."""
        self.program.consume()
        return self._take()

    def kernel_counts(self) -> dict:
        """Events emitted and lost in the kernel, per kind, and connection-map overflows."""
        raw = self.program.stats()
        names = {k.value: k.name.lower() for k in EventKind}
        emitted = {names[k]: raw[STAT_EMITTED + k] for k in names if k < N_KINDS}
        dropped = {names[k]: raw[STAT_DROPPED + k] for k in names if k < N_KINDS}
        return {"emitted": emitted, "ringbuf_full": dropped, "map_full": raw[STAT_MAP_FULL]}
