"""The ring buffer as a stream of decoded events, plus the kernel's own counters."""
from __future__ import annotations

from .decode import Ev, decode_batch
from .event_layout import EVENT_SIZE, N_KINDS, STAT_DROPPED, STAT_EMITTED, STAT_MAP_FULL, EventKind
from .program import LoadedProgram
from .ringbuf import RingBufferReader


class EventStream:
    def __init__(self, program: LoadedProgram):
        self.program = program
        fd, size = program.ring_buffer()
        self.reader = RingBufferReader(fd, size, EVENT_SIZE)

    def poll(self, timeout_ms: int) -> list[Ev]:
        """The next batch of events, waiting up to timeout_ms if none is ready."""
        self.reader.wait(timeout_ms)
        return decode_batch(self.reader.read())

    def drain(self) -> list[Ev]:
        """Everything still in the buffer, without waiting."""
        out: list[Ev] = []
        while True:
            batch = self.reader.read()
            if not batch:
                return out
            out += decode_batch(batch)

    def close(self) -> None:
        self.reader.close()

    def kernel_counts(self) -> dict:
        """Events emitted and lost in the kernel, per kind, and connection-map overflows."""
        raw = self.program.stats()
        names = {k.value: k.name.lower() for k in EventKind}
        emitted = {names[k]: raw[STAT_EMITTED + k] for k in names if k < N_KINDS}
        dropped = {names[k]: raw[STAT_DROPPED + k] for k in names if k < N_KINDS}
        return {"emitted": emitted, "ringbuf_full": dropped, "map_full": raw[STAT_MAP_FULL]}
