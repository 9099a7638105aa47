"""Frames derived from the transitions and lifecycles: state durations, summary, groupings."""
from __future__ import annotations

import pandas as pd


def state_durations(trans: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per (connection, state) with the seconds spent there (known only)."""
    known = trans[trans.ms_in_old.notna() & trans.conn_id.notna() & (trans.conn_id != 0)]
    out = known.groupby(["conn_id", "oldstate"], observed=True, sort=False).ms_in_old.sum().reset_index()
    out = out.rename(columns={"oldstate": "state", "ms_in_old": "seconds"})
    out["seconds"] = out.seconds / 1e3
    return out


def summary(durations: pd.DataFrame) -> pd.DataFrame:
    """Per state: how many dwell times, and their p50/p90/p99/max in seconds."""
    g = durations.groupby("state", observed=True).seconds
    out = pd.DataFrame({"count": g.size(), "p50_s": g.quantile(0.5), "p90_s": g.quantile(0.9),
                        "p99_s": g.quantile(0.99), "max_s": g.max()})
    return out.sort_values("count", ascending=False)


def grouped(lc: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Connections per group: how many, how many still open, lifetimes, how they ended."""
    g = lc.groupby(keys, observed=True, dropna=False)
    out = pd.DataFrame({"connections": g.size(), "open": g.end_reason.apply(lambda s: (s == "open").sum()),
                        "median_s": g.duration_s.median(), "max_s": g.duration_s.max()})
    ends = pd.crosstab([lc[k] for k in keys], lc.end_reason, dropna=False) if len(lc) else None
    if ends is not None:
        out = out.join(ends.loc[:, (ends != 0).any()], how="left")
    return out.sort_values("connections", ascending=False)
