"""-p/-L/-D/-4/-6 and --cgroup/--container on a recording's connections, as the live tracer
applied them (a cgroup by the path the recording resolved it to: Filters.cgroup_match_recorded).

The kernel filters only where an event shows enough, so a filtered recording also holds
connections the live session then dropped in user space (accepted sockets of other
processes' listeners, among them). The live Tracker keeps a connection when
probes.filters.Filters.match says so, given every pid that acted on it (connect, listen,
the closing calls, reads and writes) and its listener's owner; here the same rule
(Filters.match_columns) is given the same pids, read from the events column-wise.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from tcplife_trace.analysis.rules import ACTING
from tcplife_trace.probes.event_layout import EventKind
from tcplife_trace.probes.filters import Filters

# the state changes whose task the Tracker counts among a connection's pids (set_owner):
# the acting transitions (connect, listen, the closing calls: analysis/rules.py ACTING)


def owned(cols, pids) -> np.ndarray:
    """The ids of the connections one of `pids` acted on (sorted, unique)."""
    if not pids:
        return np.zeros(0, dtype=np.uint64)
    seg = cols.by_connection()
    pids = np.asarray(pids, dtype=np.uint32)
    acting = np.zeros(len(seg.old), dtype=bool)
    for a, b in ACTING:
        acting |= (seg.old == a) & (seg.new == b)
    acting &= np.isin(seg.sorted_column("pid"), pids)
    found = [seg.ids[seg.number[acting]].astype(np.uint64)]
    rows = np.flatnonzero(cols["kind"] == EventKind.IO_OWNER)  # every read or write (Tracker._io)
    if len(rows):
        rows = rows[np.isin(cols.at("pid", rows, ascending=True), pids)]
        found.append(seg.ids_of(rows, cols.at("gen", rows, ascending=True)).astype(np.uint64))
    out = np.unique(np.concatenate(found))
    return out[out != 0]


def kept(lc: pd.DataFrame, cols, filters: Filters, conns: np.ndarray | None = None) -> np.ndarray:
    """Which rows of a lifecycles frame (made from `cols`) the filters keep, by the live rule.
    conns: only these rows are judged (the others: False)."""
    own = None
    if filters.pids:
        ids = lc["conn_id"].to_numpy(dtype=np.uint64, na_value=0)
        listener_pid = lc["listener_pid"].to_numpy(dtype=np.int64, na_value=-1)
        own = np.isin(ids, owned(cols, filters.pids)) | np.isin(listener_pid, filters.pids)
    keep = dataclasses.replace(filters, cgroups=()).match_columns(
        family=lc["family"].to_numpy(dtype=np.int64, na_value=0),
        lport=lc["lport"].to_numpy(dtype=np.int64, na_value=0),
        rport=lc["rport"].to_numpy(dtype=np.int64, na_value=0),
        listener=(lc["role"] == "listener").to_numpy(dtype=bool), owned=own)
    if filters.cgroups:  # the owner's cgroup, by the id and the path the recording resolved it to
        ids = lc["cgroup_id"].to_numpy(dtype=np.uint64, na_value=0)
        paths = lc["cgroup"].astype(object).where(lc["cgroup"].notna(), None).tolist()
        verdict = {key: filters.cgroup_match_recorded(*key) for key in set(zip(ids.tolist(), paths))}
        keep &= np.array([verdict[key] for key in zip(ids.tolist(), paths)], dtype=bool)
    return keep if conns is None else keep & conns


def files_of(lc: pd.DataFrame, cols, file_rows: np.ndarray) -> np.ndarray:
    """Per row of a lifecycles frame, the index of the file (of several loaded as one: their
    first table rows `file_rows`, and the end) its connection's first event is in."""
    if len(file_rows) <= 2:
        return np.zeros(len(lc), dtype=np.int64)
    seg = cols.by_connection()
    every = np.arange(cols.table.num_rows)
    ids = seg.ids_of(every, cols["gen"]).astype(np.uint64)
    uniq, first = np.unique(ids, return_index=True)
    conn = lc["conn_id"].to_numpy(dtype=np.uint64, na_value=0)
    pos = np.minimum(np.searchsorted(uniq, conn), max(len(uniq) - 1, 0))
    return np.searchsorted(file_rows, first[pos], side="right") - 1


def both(a: Filters, b: Filters) -> Filters:
    """One Filters that keeps a socket (one owner) when both keep it; where they share nothing
    (-p 1 and -p 2), one that keeps none (local port 0: no socket has it)."""
    nothing = Filters(lports=(0,))

    def meet(x: tuple, y: tuple):
        if not x or not y:
            return x or y
        common = tuple(v for v in x if v in y)
        return common or None
    parts = {k: meet(getattr(a, k), getattr(b, k)) for k in ("pids", "lports", "rports")}
    if None in parts.values() or (a.family and b.family and a.family != b.family):
        return nothing
    return Filters(family=a.family or b.family, **parts)
