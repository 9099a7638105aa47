"""Leak findings from a recording: the detectors fed with what the trace alone knows.

"Now" is when the recording stopped (or its last event, if it was cut). Sockets present then are the connections still
open at the end (in their last state, aged from the transition into it) plus the
TIME_WAIT sockets of active closes in the last minute. No sock_diag, so no request
sockets (SYN floods), no kernel counters, no sockets opened before the recording
and the ephemeral port range is Linux's default unless given.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .analysis import leaks

DEFAULT_PORT_RANGE = (32768, 60999)


def _endpoints(lc: pd.DataFrame) -> dict:
    """The lifecycles columns every detector frame shares, under the detectors' names."""
    return {"netns": lc["netns"], "laddr": lc["laddr"].astype(object), "lport": lc["lport"].astype("Int64"),
            "raddr": lc["raddr"].astype(object), "rport": lc["rport"].astype("Int64"),
            "owner_pid": lc["pid"].astype("Int64"), "owner_comm": lc["comm"].astype(object)}


def _sockets(lc: pd.DataFrame, state, *, inode: int, timer: str, age, lower, eof_age) -> pd.DataFrame:
    """Lifecycles as rows of the detectors' `sockets` frame (no sock_diag: no queues, idle times, fd)."""
    return pd.DataFrame({**_endpoints(lc), "state": state, "inode": inode, "timer": timer, "rqueue": 0,
                         "wqueue": 0, "idle_recv_s": np.nan, "idle_sent_s": np.nan,
                         "owner_fd": pd.array([pd.NA] * len(lc), "Int64"), "age_s": age,
                         "age_lower_bound": lower, "eof_age_s": eof_age}, columns=list(leaks.SOCKET_COLUMNS))


def evidence(lifecycles: pd.DataFrame, transitions: pd.DataFrame,
             port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
             stopped: pd.Timestamp | None = None) -> leaks.Evidence:
    """stopped: when the recording ended (a clean close stores it), else its last event."""
    if transitions.empty:
        return leaks.Evidence(leaks.empty_sockets(), leaks.empty_ended(), 1e-3)
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
    tw = lc[lc["time_wait"] & (lc["end"] > now - pd.Timedelta(seconds=leaks.TIME_WAIT_S))].reset_index(drop=True)
    tw_rows = _sockets(tw, "TIME_WAIT", inode=0, timer="timewait", age=(now - tw["end"]).dt.total_seconds(),
                       lower=False, eof_age=np.nan)
    sockets = pd.concat([open_rows, tw_rows], ignore_index=True) if len(tw_rows) else open_rows
    done = lc[lc["end"].notna()]
    ended = pd.DataFrame({**_endpoints(done), "role": done["role"].astype(str),
                          "end_reason": done["end_reason"].astype(str), "time_wait": done["time_wait"].astype(bool)},
                         columns=list(leaks.ENDED_COLUMNS))
    new_lis = pd.DataFrame(_endpoints(open_[(open_["role"] == "listener") & open_["birth_seen"]]))
    duration = max((now - t0).total_seconds(), 1e-3)
    sysctls = {int(ns): {"ip_local_port_range": port_range} for ns in pd.unique(lc["netns"].dropna())}
    return leaks.Evidence(sockets, ended, duration, {}, sysctls, new_lis, complete_snapshot=True)


def stopped_at(ends: list) -> pd.Timestamp | None:
    """When the recordings stopped, from their clean-close summaries."""
    stops = [e["stop_wall"] for e in ends if e and e.get("stop_wall")]
    return pd.Timestamp(max(stops), unit="s", tz="UTC") if stops else None


def findings(lifecycles: pd.DataFrame, transitions: pd.DataFrame, thresholds=None,
             port_range: tuple[int, int] = DEFAULT_PORT_RANGE, stopped=None) -> pd.DataFrame:
    """The `.leaks()` frame."""
    return leaks.frame(leaks.find(evidence(lifecycles, transitions, port_range, stopped), thresholds))
