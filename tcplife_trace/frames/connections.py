"""Frames derived from the transitions and lifecycles: state durations, summary, groupings."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from .columns import STATE_CATEGORIES


_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)  # set bits per byte


def state_durations(trans: pd.DataFrame) -> pd.DataFrame:
    """Long form from a transitions frame (e.g. one cut to a time window): one row per
    (connection, state) with the seconds spent there (known only)."""
    ms = trans.ms_in_old.to_numpy()
    conn = trans.conn_id.to_numpy(dtype=np.uint64, na_value=0)
    known = ~np.isnan(ms) & (conn != 0)
    conn, ms = conn[known], ms[known]
    state = trans.oldstate.cat.codes.to_numpy()[known].astype(np.int16) + 1
    order = np.argsort(conn, kind="stable")   # by connection, recorded order inside
    return durations(conn[order], state[order], ms[order] / 1e3)


def recorded_state_durations(by) -> pd.DataFrame:
    """The same from a recording's state changes sorted by connection (by_connection)."""
    pos, ns = by.time_in_old()
    seconds = ns.astype(np.float64)
    del ns
    seconds /= 1e9
    return durations(by.ids[by.number[pos]], by.old[pos], seconds)


def durations(conn: np.ndarray, state: np.ndarray, seconds: np.ndarray) -> pd.DataFrame:
    """Time in each state left, rows grouped by connection -> one row per (connection,
    state), summed. Rows stay in order unless a connection was in a state twice."""
    n = len(conn)
    state = np.minimum(state, 15).astype(np.uint8, copy=False)  # (0 and 13-15: not a state we name)
    starts = np.flatnonzero(np.r_[True, conn[1:] != conn[:-1]]) if n else np.zeros(0, np.int64)
    if n:
        seen = np.bitwise_or.reduceat(np.left_shift(np.uint16(1), state, dtype=np.uint16), starts)
        repeated = (_BITS[seen & 0xFF] + _BITS[seen >> 8] != np.diff(np.r_[starts, n])).any()
    if n and repeated:  # sum the repeats: rows by (connection, state)
        key = (np.cumsum(np.r_[True, conn[1:] != conn[:-1]]) - 1) * 16 + state.astype(np.int64)
        order = np.argsort(key, kind="stable")
        k = key[order]
        first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        conn, state = conn[order[first]], state[order[first]]
        seconds = np.add.reduceat(seconds[order], first)
    codes = state.astype(np.int8) - np.int8(1)    # kernel states 1..12 -> categories 0..11
    codes[codes >= len(STATE_CATEGORIES)] = -1
    return pd.DataFrame(copy=False, data={
        "conn_id": pd.arrays.IntegerArray(conn.astype(np.uint64, copy=False), np.zeros(len(conn), bool)),
        "state": pd.Categorical.from_codes(codes, categories=STATE_CATEGORIES),
        "seconds": seconds,
    })


def summary(durations: pd.DataFrame) -> pd.DataFrame:
    """Per state: how many connections spent time there, and the p50/p90/p99/max seconds."""
    codes = durations.state.cat.codes.to_numpy()
    seconds = durations.seconds.to_numpy()
    present = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(STATE_CATEGORIES)))

    def one(k: int) -> tuple:
        v = seconds[codes == k]  # a scratch copy: partitioned in place
        return (STATE_CATEGORIES[k], len(v), *_quantiles(v))
    with ThreadPoolExecutor(2) as pool:  # states on two threads (numpy releases the GIL)
        rows = list(pool.map(one, present))
    out = pd.DataFrame(rows, columns=["state", "count", "p50_s", "p90_s", "p99_s", "max_s"])
    out["state"] = pd.Categorical(out.state, categories=STATE_CATEGORIES)
    return out.sort_values("count", ascending=False, kind="stable").set_index("state")


def _quantiles(v: np.ndarray) -> tuple[float, float, float, float]:
    """p50, p90, p99 (linear interpolation, as numpy and pandas) and max of v, partitioned
    in place (v is a scratch copy)."""
    n = len(v)
    pos = [q * (n - 1) for q in (0.5, 0.9, 0.99)]
    kth = sorted({int(p) for p in pos} | {min(int(p) + 1, n - 1) for p in pos} | {n - 1})
    v.partition(kth)
    out = [v[int(p)] + (v[min(int(p) + 1, n - 1)] - v[int(p)]) * (p - int(p)) for p in pos]
    return (*out, v[n - 1])


def grouped(lc: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Connections per group (the groups present only): how many, how many still open, median
    and longest lifetime, and one column per way the others ended, most connections first."""
    g = lc.groupby(keys, observed=True, dropna=False, sort=False)
    still = (lc["end_reason"] == "open").groupby([lc[k] for k in keys], observed=True, dropna=False, sort=False)
    out = pd.DataFrame({"connections": g.size(), "open": still.sum(),
                        "median_s": g["duration_s"].median(), "max_s": g["duration_s"].max()})
    # (a crosstab would make every combination of the keys' categories: 65k peers x 65k ports)
    ends = lc.groupby([*keys, "end_reason"], observed=True, dropna=False, sort=False).size()
    if len(ends):
        ends = ends.unstack("end_reason", fill_value=0)
        order = getattr(lc["end_reason"], "cat", None)
        if order is not None:  # the vocabulary's order, not the order they first appear in
            ends = ends[[c for c in order.categories if c in ends.columns]]
        ends = ends.drop(columns=["open"], errors="ignore")  # (the `open` column already says it)
        out = out.join(ends, how="left")
    return out.sort_values("connections", ascending=False, kind="stable")
