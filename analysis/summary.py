"""Per-state time statistics for the exit summary, in bounded memory."""
from __future__ import annotations

import math
import random
from array import array

import numpy as np

from tcplife_trace.probes.tcp_states import state_name

EXACT = 200_000      # samples kept exactly per state (1.6 MB each at most)
RESERVOIR = 100_000  # beyond that, a uniform reservoir of this many (0.8 MB)


class StateTimes:
    """Time spent in each state; percentiles exact up to EXACT samples, sampled beyond."""

    def __init__(self, exact: int = EXACT, reservoir: int = RESERVOIR, seed: int = 0):
        self.exact_cap = exact
        self.reservoir = reservoir
        self._exact: dict[int, array] = {}
        self._res: dict[int, array] = {}
        self._count: dict[int, int] = {}
        self._max: dict[int, int] = {}
        self._w: dict[int, float] = {}     # algorithm L's running weight, per state
        self._next: dict[int, int] = {}    # count at which the next sample is kept
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)  # add_many's draws, a block at a time

    def add(self, state: int, dur_ns: int) -> None:
        a = self._exact.get(state)
        if a is None:
            a = self._exact[state] = array("q")
        if len(a) < self.exact_cap:
            a.append(dur_ns)
            return
        self._add_sampled(state, dur_ns)

    def add_many(self, state: int, durs_ns) -> None:
        """add() for each value of a numpy column, in its order: the exact samples the same, and
        beyond EXACT a uniform reservoir by the same algorithm (its random steps drawn in
        blocks by numpy, so not the same reservoir as add() one at a time would keep)."""
        durs = np.asarray(durs_ns, dtype=np.int64)
        a = self._exact.get(state)
        if a is None:
            a = self._exact[state] = array("q")
        room = self.exact_cap - len(a)
        if room > 0:
            a.frombytes(durs[:room].tobytes())
            durs = durs[room:]
        if not len(durs):
            return
        if state not in self._res:  # the switch to a reservoir, as _add_sampled makes it
            self._add_sampled(state, int(durs[0]))
            durs = durs[1:]
            if not len(durs):
                return
        start = self._count[state]  # samples counted so far; durs[i] is sample start + i + 1
        end = self._count[state] = start + len(durs)
        self._max[state] = max(self._max[state], int(durs.max()))
        size = self.reservoir
        while self._next[state] <= end:
            # algorithm L's steps drawn a block at a time: the weight after each kept sample,
            # the skip to the next one, the slot it takes (the same law as _add_sampled's steps)
            k = min(max(int(size * math.log(end / self._next[state])) + 16, 16), 65536)
            u = self._np_rng.random((3, k))
            u[u == 0] = 1e-300
            w = self._w[state] * np.exp(np.cumsum(np.log(u[0])) / size)
            skips = np.floor(np.log(u[1]) / np.log1p(-np.minimum(w, 1 - 1e-16))).astype(np.int64) + 1
            pos = self._next[state] + np.concatenate(([0], np.cumsum(skips[:-1])))
            m = int(np.searchsorted(pos, end, side="right"))  # the kept ones within these samples
            res = np.frombuffer(self._res[state], dtype=np.int64)
            res[(u[2][:m] * size).astype(np.int64)] = durs[pos[:m] - start - 1]
            del res
            self._w[state] = float(w[m - 1])
            self._next[state] = int(pos[m]) if m < k else int(pos[-1] + skips[-1])

    def _add_sampled(self, state: int, dur_ns: int) -> None:
        """Reservoir sampling by skips (Li's algorithm L): one comparison per sample, random
        numbers only when a sample is kept (the per-sample draw was a sixth of the consumer)."""
        res = self._res.get(state)
        if res is None:  # switch to a reservoir seeded with a uniform sample of the exact ones
            a = self._exact[state]
            # (numpy's draw without replacement: random.sample of 200,000 took a third of a second)
            picked = np.sort(self._np_rng.choice(len(a), self.reservoir, replace=False))
            res = self._res[state] = array("q", np.frombuffer(a, dtype=np.int64)[picked].tobytes())
            self._count[state] = len(a)
            self._max[state] = max(a)
            self._w[state] = math.exp(math.log(self._rng.random()) / self.reservoir)
            self._next[state] = self._skip(state, len(a))
        n = self._count[state] = self._count[state] + 1
        if dur_ns > self._max[state]:
            self._max[state] = dur_ns
        if n == self._next[state]:
            res[self._rng.randrange(self.reservoir)] = dur_ns
            self._w[state] *= math.exp(math.log(self._rng.random()) / self.reservoir)
            self._next[state] = self._skip(state, n)

    def _skip(self, state: int, n: int) -> int:
        """The count at which the next sample enters the reservoir."""
        w = self._w[state]
        if w >= 1.0:
            return n + 1
        u = self._rng.random() or 1e-300
        return n + int(math.log(u) / math.log1p(-w)) + 1

    def _stats(self, state: int) -> tuple[int, int, list[int]]:
        if state in self._res:
            return self._count[state], self._max[state], sorted(self._res[state])
        s = sorted(self._exact[state])
        return len(s), s[-1], s

    def table(self) -> list[dict]:
        """One row per state: count, p50/p90/p99/max in milliseconds, most frequent first."""
        rows = []
        for state in self._exact:
            count, mx, s = self._stats(state)
            if not count:
                continue
            rows.append({"state": state_name(state), "count": count, "p50_ms": _pct(s, 0.50),
                         "p90_ms": _pct(s, 0.90), "p99_ms": _pct(s, 0.99), "max_ms": mx / 1e6})
        rows.sort(key=lambda r: -r["count"])
        return rows


def _pct(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    return sorted_ns[min(len(sorted_ns) - 1, int(p * len(sorted_ns)))] / 1e6
