"""Leak findings from a recording: the detectors fed with what the recording knows.

With sock_diag snapshots in the recording (`--record` with `--poll-interval`), the sockets are
those of the last snapshot, as the live detectors saw them: sockets opened before the
recording, request sockets, owners from /proc, queues and idle times, and the namespaces'
counters and sysctls (their change since the first snapshot). Without, "now" is when the
recording stopped (or its last event, if it was cut) and the sockets present then are the
connections still open at the end (in their last state, aged from the transition into it)
plus the TIME_WAIT sockets of active closes in the last minute: no request sockets (SYN
floods), no kernel counters, no sockets opened before the recording, and the ephemeral port
range is Linux's default unless given.
The ended connections' health (retransmits, deaths, handshake and RTT times per peer) is
tallied from the lifecycles frame's columns (a recording of schema 3) by the rule the live
detectors use (analysis/evidence.py tally_frame, ending_values).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tcplife_trace.analysis import leaks
from tcplife_trace.analysis.evidence import (ENDED_COLUMNS, SOCKET_COLUMNS, Evidence, empty_ended, empty_sockets,
                                            established_paths, scoped_counters, tally_frame)
from tcplife_trace.probes import socket_age

DEFAULT_PORT_RANGE = (32768, 60999)


def _endpoints(lc: pd.DataFrame) -> dict:
    """The lifecycles columns every detector frame shares, under the detectors' names."""
    return {"netns": lc["netns"], "laddr": lc["laddr"].astype(object), "lport": lc["lport"].astype("Int64"),
            "raddr": lc["raddr"].astype(object), "rport": lc["rport"].astype("Int64"),
            "owner_pid": lc["pid"].astype("Int64"), "owner_comm": lc["comm"].astype(object)}


def _sockets(lc: pd.DataFrame, state, *, inode: int, timer: str, age, lower, eof_age,
             source: str = socket_age.TRACE) -> pd.DataFrame:
    """Lifecycles as rows of the detectors' `sockets` frame (no sock_diag: no queues, idle times, fd)."""
    return pd.DataFrame({**_endpoints(lc), "state": state, "inode": inode, "timer": timer, "rqueue": 0,
                         "wqueue": 0, "idle_recv_s": np.nan, "idle_sent_s": np.nan,
                         "owner_fd": pd.array([pd.NA] * len(lc), "Int64"), "age_s": age,
                         "age_lower_bound": lower, "eof_age_s": eof_age, "age_source": source},
                        columns=list(SOCKET_COLUMNS))


def evidence(lifecycles: pd.DataFrame, transitions: pd.DataFrame,
             port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
             stopped: pd.Timestamp | None = None, snapshots: list | None = None,
             filters=None) -> Evidence:
    """stopped: when the recording ended (a clean close stores it), else its last event.
    snapshots: the recording's (wall ns, meta, sockets) in time order; the last is "now"."""
    if snapshots:
        return _from_snapshots(lifecycles, transitions, snapshots, filters)
    if transitions.empty:
        return Evidence(empty_sockets(), empty_ended(), 1e-3)
    t0, now = transitions["time"].min(), transitions["time"].max()
    if stopped is not None and stopped > now:
        now = stopped
    lc = lifecycles.reset_index(drop=True)
    open_ = lc[lc["end"].isna()].reset_index(drop=True)
    mine = transitions[transitions["conn_id"].isin(open_["conn_id"])] if len(open_) < len(lc) else transitions
    entered = mine.groupby("conn_id", sort=False)["time"].max()  # when each open one entered its state
    since = entered.reindex(open_["conn_id"]).reset_index(drop=True)
    open_rows = _sockets(open_, open_["path"].astype(str).str.rsplit(" ", n=1).str[-1], inode=1, timer="?",
                         age=(now - since).dt.total_seconds(), lower=~open_["birth_seen"].astype(bool),
                         eof_age=(now - open_["eof_seen"]).dt.total_seconds())
    tw_rows = _time_wait(lc, now)
    sockets = pd.concat([open_rows, tw_rows], ignore_index=True) if len(tw_rows) else open_rows
    ended = _ended(lc)
    new_lis = pd.DataFrame(_endpoints(open_[(open_["role"] == "listener") & open_["birth_seen"]]))
    duration = max((now - t0).total_seconds(), 1e-3)
    sysctls = {int(ns): {"ip_local_port_range": port_range} for ns in pd.unique(lc["netns"].dropna())}
    health, times = tally_frame(lc).frames()
    return Evidence(sockets, ended, duration, {}, sysctls, new_lis, complete_snapshot=True,
                          ended_health=health, ended_times=times)


def _time_wait(lc: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """TIME_WAIT rows of the detectors' sockets frame: the active closes of the minute before now."""
    tw = lc[lc["time_wait"] & (lc["end"] <= now) & (lc["end"] > now - pd.Timedelta(seconds=leaks.TIME_WAIT_S))]
    tw = tw.reset_index(drop=True)
    return _sockets(tw, "TIME_WAIT", inode=0, timer="timewait", age=(now - tw["end"]).dt.total_seconds(),
                    lower=False, eof_age=np.nan)


def _ended(lc: pd.DataFrame) -> pd.DataFrame:
    """The detectors' endings frame: one row per connection that ended (as the live Watch
    counts them: not an established connection that timed out, which is no failed connect)."""
    done = lc[lc["end"].notna()]
    if len(done) and "path" in done:
        done = done[~((done["end_reason"].astype(str) == "timeout").to_numpy() & established_paths(done["path"]))]
    return pd.DataFrame({**_endpoints(done), "role": done["role"].astype(str),
                         "end_reason": done["end_reason"].astype(str), "time_wait": done["time_wait"].astype(bool)},
                        columns=list(ENDED_COLUMNS))


def _from_snapshots(lifecycles: pd.DataFrame, transitions: pd.DataFrame, snapshots: list,
                    filters=None) -> Evidence:
    """The detectors' view at the last snapshot: its sockets (ages as of then), the endings
    the trace saw, the counters' change since the first snapshot, the listeners that
    appeared in between."""
    (t_first, first, first_socks), (t_last, meta, socks) = snapshots[0], snapshots[-1]
    now = pd.Timestamp(t_last, unit="ns", tz="UTC")
    lc = lifecycles.reset_index(drop=True)
    from ..recording import _sockets_kept
    sockets = _sockets_kept(socks, filters)
    if not meta["complete"]:  # the periodic kind skips TIME_WAIT: the trace's active closes of the last minute
        tw = _time_wait(lc, now)
        if len(tw):
            sockets = pd.concat([sockets, tw], ignore_index=True)
    deltas = {}
    for ns, counters in meta.get("mibs", {}).items():
        before = first.get("mibs", {}).get(ns, {}) if len(snapshots) > 1 else counters
        deltas[ns] = {k: v - before.get(k, 0) for k, v in counters.items() if v - before.get(k, 0) > 0}
    deltas, scope = scoped_counters(deltas, socks, sockets, filters)
    key = ["netns", "laddr", "lport"]
    lis = sockets[sockets["state"] == "LISTEN"]
    seen = first_socks[first_socks["state"] == "LISTEN"][key].drop_duplicates() if len(snapshots) > 1 else lis[key]
    new_lis = lis.merge(seen.assign(_old=True), on=key, how="left")
    new_lis = new_lis[new_lis["_old"].isna()].drop(columns="_old")
    t0 = transitions["time"].min() if len(transitions) else now
    duration = max((now - min(t0, pd.Timestamp(t_first, unit="ns", tz="UTC"))).total_seconds(), 1e-3)
    health, times = tally_frame(lc[lc["end"] <= now]).frames()
    return Evidence(sockets, _ended(lc[lc["end"] <= now]), duration, deltas, meta.get("sysctls", {}),
                          new_lis, complete_snapshot=bool(meta["complete"]), counter_scope=scope,
                          ended_health=health, ended_times=times)


def snapshot_kind(meta: dict) -> str:
    """What a recorded snapshot holds, in words: every state, or the periodic kind (no
    TIME_WAIT; ESTABLISHED only when that look took it; recordings before `states` never did)."""
    if meta.get("complete"):
        return "every state"
    if int(meta.get("states") or 0) >> 1 & 1:  # TCP_ESTABLISHED is state 1
        return "the periodic kind: no TIME_WAIT"
    return "the periodic kind: no ESTABLISHED or TIME_WAIT"


def stopped_at(ends: list) -> pd.Timestamp | None:
    """When the recordings stopped, from their clean-close summaries."""
    stops = [e["stop_wall"] for e in ends if e and e.get("stop_wall")]
    return pd.Timestamp(max(stops), unit="s", tz="UTC") if stops else None


def findings(lifecycles: pd.DataFrame, transitions: pd.DataFrame, thresholds=None,
             port_range: tuple[int, int] = DEFAULT_PORT_RANGE, stopped=None, snapshots: list | None = None,
             filters=None) -> pd.DataFrame:
    """The `.leaks()` frame."""
    return leaks.frame(leaks.find(evidence(lifecycles, transitions, port_range, stopped, snapshots, filters),
                                  thresholds))
