"""Direct, batched reading of a BPF ring buffer through mmap.

bcc hands ring-buffer records to Python one ctypes callback at a time, which
costs more than all our decoding. Every tcplife-trace record has the same size,
so the data between the consumer and producer positions is an array we can
check and copy in one go (the data pages are mapped twice, so a batch that
wraps is contiguous). The layout is the kernel's (kernel/bpf/ringbuf.c), the
same one libbpf reads.
"""
from __future__ import annotations

import mmap
import select
import struct

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_Q = struct.Struct("<Q")


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int, sample_size: int, max_batch: int = 8192):
        if data_size & (data_size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        # consumer position: read-write page at offset 0
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # producer position page, then the data pages mapped twice, read-only
        self._prod = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = page
        self._mask = data_size - 1
        self.sample_size = sample_size
        self.record_size = (sample_size + HDR_SIZE + 7) & ~7
        self._words = self.record_size // 4
        self.max_batch = max_batch
        self.discarded = 0
        self.data_size = data_size
        self.peak_fill = 0  # most bytes ever waiting when we looked
        self._none = np.empty((0, sample_size), dtype=np.uint8)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def watch(self, fd: int) -> None:
        """wait() wakes for that ring buffer's data as well (a second ring read alongside)."""
        self._epoll.register(fd, select.EPOLLIN)

    def pending(self) -> bool:
        return _Q.unpack_from(self._prod, 0)[0] != _Q.unpack_from(self._cons, 0)[0]

    def fill(self) -> float:
        """Share of the ring waiting to be read now (1: full)."""
        return max(0, _Q.unpack_from(self._prod, 0)[0] - _Q.unpack_from(self._cons, 0)[0]) / self.data_size

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel signals new data (or timeout), unless data is already there."""
        if not self.pending():
            self._epoll.poll(timeout_ms / 1000.0)

    def read(self) -> bytes:
        """Up to max_batch committed samples, concatenated (each sample_size bytes)."""
        out = self.read_array()
        return out.tobytes() if len(out) else b""

    def read_array(self) -> np.ndarray:
        """read() as a (samples, sample_size) uint8 array of its own: the samples copied once,
        straight from the mapped pages."""
        cons = _Q.unpack_from(self._cons, 0)[0]
        prod = _Q.unpack_from(self._prod, 0)[0]
        waiting = prod - cons
        if waiting > self.peak_fill:
            self.peak_fill = waiting
        avail = min(waiting, self.max_batch * self.record_size)
        if avail <= 0:
            return self._none
        start = self._data + (cons & self._mask)
        n = avail // self.record_size
        # a view of the mapped pages (mapped twice: a batch that wraps is contiguous), let go
        # before returning (an mmap with a view on it cannot be closed)
        view = lens = good = None
        try:
            view = np.frombuffer(self._prod, dtype=np.uint8, count=n * self.record_size, offset=start)
            lens = view.view("<u4")[::self._words]
            good = lens == self.sample_size
            if not good.all():
                k = int(np.argmin(good))
                if lens[k] & BUSY_BIT or k > 0:
                    n = k  # stop before the first record still being written (or an odd one)
                else:
                    odd = self._read_odd(cons, bytes(view[:self.record_size]))
                    return np.frombuffer(bytearray(odd), dtype=np.uint8).reshape(-1, self.sample_size)
            if n == 0:
                return self._none
            payload = view[:n * self.record_size].reshape(n, self.record_size)[:, HDR_SIZE:HDR_SIZE + self.sample_size].copy()
        finally:
            del view
            lens = good = None
        _Q.pack_into(self._cons, 0, cons + n * self.record_size)
        return payload

    def _read_odd(self, cons: int, blob: bytes) -> bytes:
        """A discarded or differently sized record at the head: step over it alone."""
        length = struct.unpack_from("<I", blob, 0)[0]
        size = ((length & ~(BUSY_BIT | DISCARD_BIT)) + HDR_SIZE + 7) & ~7
        out = b""
        if length & DISCARD_BIT:
            self.discarded += 1
        elif length == self.sample_size:
            out = blob[HDR_SIZE:HDR_SIZE + self.sample_size]
        else:
            self.discarded += 1  # not one of ours: never expected
        _Q.pack_into(self._cons, 0, cons + size)
        return out

    def close(self) -> None:
        self._epoll.close()
        self._cons.close()
        self._prod.close()
