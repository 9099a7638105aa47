"""probes/health.fold_columns (a batch of LIFE records' health as columns, for the offline
frames) gives what health.from_fold gives record by record, NA for NA."""
import random

import numpy as np

from tcplife_trace.probes import btf, health

_BITS = {"mss_cache": 16, "rate_delivered": 24, "rate_interval_us": 24}


def test_fold_columns_equal_from_fold_row_by_row():
    rng = random.Random(3)
    names = list(btf.TCP_SOCK_HEALTH)
    rows = []
    for _ in range(2000):
        mask = rng.getrandbits(len(names)) if rng.random() < 0.7 else (1 << len(names)) - 1
        vals = [rng.choice([0, rng.getrandbits(_BITS.get(n, rng.choice([8, 16, 32]))), 1]) for n in names]
        if rng.random() < 0.1:
            vals[names.index("rtt_min")] = health.NO_MIN_RTT
        rows.append((mask, tuple(vals)))
    cols = health.fold_columns(np.array([m for m, _ in rows]), np.array([v for _, v in rows], dtype=np.uint64))
    assert tuple(cols) == health.COLUMNS
    for k, (m, v) in enumerate(rows):
        want = health.from_fold((m, v))
        got = {c: cols[c][0][k].item() if cols[c][1][k] else None for c in health.COLUMNS}
        assert got == want, (m, v)
    none = health.fold_columns(np.zeros(3, np.uint32), np.zeros((3, len(names)), np.uint64))
    assert not any(ok.any() for _, ok in none.values())  # nothing read: every column NA
