"""Frames derived from the transitions and lifecycles: state durations, summary, groupings."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .frames import STATE_CATEGORIES


def state_durations(trans: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per (connection, state) with the seconds spent there (known only)."""
    ms = trans.ms_in_old.to_numpy()
    conn = trans.conn_id.to_numpy(dtype=np.uint64, na_value=0)
    known = ~np.isnan(ms) & (conn != 0)
    state = trans.oldstate.cat.codes.to_numpy()[known].astype(np.int64)
    codes, keys = pd.factorize(conn[known].astype(np.int64) * 16 + state)
    seconds = np.bincount(codes, weights=ms[known], minlength=len(keys)) / 1e3
    return pd.DataFrame({
        "conn_id": pd.array((keys // 16).astype(np.uint64), dtype="UInt64"),
        "state": pd.Categorical.from_codes((keys % 16).astype(np.int64), categories=STATE_CATEGORIES),
        "seconds": seconds,
    })


def summary(durations: pd.DataFrame) -> pd.DataFrame:
    """Per state: how many connections spent time there, and the p50/p90/p99/max seconds."""
    codes = durations.state.cat.codes.to_numpy()
    seconds = durations.seconds.to_numpy()
    rows = []
    for k in np.unique(codes[codes >= 0]):
        v = seconds[codes == k]
        p50, p90, p99 = np.quantile(v, [0.5, 0.9, 0.99])  # linear interpolation, as pandas
        rows.append((STATE_CATEGORIES[k], len(v), p50, p90, p99, v.max()))
    out = pd.DataFrame(rows, columns=["state", "count", "p50_s", "p90_s", "p99_s", "max_s"])
    out["state"] = pd.Categorical(out.state, categories=STATE_CATEGORIES)
    return out.sort_values("count", ascending=False, kind="stable").set_index("state")


def grouped(lc: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Connections per group: how many, how many still open, lifetimes, how they ended."""
    g = lc.groupby(keys, observed=True, dropna=False)
    out = pd.DataFrame({"connections": g.size(), "open": g.end_reason.apply(lambda s: (s == "open").sum()),
                        "median_s": g.duration_s.median(), "max_s": g.duration_s.max()})
    ends = pd.crosstab([lc[k] for k in keys], lc.end_reason, dropna=False) if len(lc) else None
    if ends is not None:
        out = out.join(ends.loc[:, (ends != 0).any()], how="left")
    return out.sort_values("connections", ascending=False)
