"""Per-state time statistics for the exit summary, in bounded memory."""
from __future__ import annotations

import random

from ..probes.tcp_states import state_name

RESERVOIR = 100_000  # samples kept per state; exact percentiles below this many


class StateTimes:
    """Time spent in each state; percentiles exact up to RESERVOIR samples, sampled beyond."""

    def __init__(self, reservoir: int = RESERVOIR, seed: int = 0):
        self.reservoir = reservoir
        self.count: dict[int, int] = {}
        self.max_ns: dict[int, int] = {}
        self.samples: dict[int, list[int]] = {}
        self._rng = random.Random(seed)

    def add(self, state: int, dur_ns: int) -> None:
        n = self.count.get(state, 0) + 1
        self.count[state] = n
        if dur_ns > self.max_ns.get(state, -1):
            self.max_ns[state] = dur_ns
        s = self.samples.setdefault(state, [])
        if len(s) < self.reservoir:
            s.append(dur_ns)
        else:
            j = self._rng.randrange(n)
            if j < self.reservoir:
                s[j] = dur_ns

    def table(self) -> list[dict]:
        """One row per state: count, p50/p90/p99/max in milliseconds."""
        rows = []
        for state in sorted(self.count, key=lambda s: -self.count[s]):
            s = sorted(self.samples[state])

            def pct(p: float) -> float:
                return s[min(len(s) - 1, int(p * len(s)))] / 1e6
            rows.append({"state": state_name(state), "count": self.count[state],
                         "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
                         "max_ms": self.max_ns[state] / 1e6})
        return rows
