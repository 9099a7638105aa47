"""What the leak detectors read (analysis/leaks.py), shaped from whatever it came from (a
live trace joined to sock_diag snapshots, or a recording): `Evidence` holds
  - `sockets`: one row per socket present now (SOCKET_COLUMNS; `sockets_frame` gives the dtypes),
  - `ended`: connections that ended during the observation (ENDED_COLUMNS; an optional
    column `n` says how many connections a row stands for, 1 without it),
  - per-namespace counter deltas and settings, and how long we watched,
  - `ended_health` / `ended_times`: the ended connections' health at their CLOSE per peer
    and owner (PeerTally: retransmits, deaths, handshake and RTT histograms).
The filters (-p/-L/-D/-4/-6) narrow it here (`sockets_matching`, `scoped_*`), and `endpoint(s)`
spell a socket's address as every finding does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SOCKET_COLUMNS = ("netns", "state", "laddr", "lport", "raddr", "rport", "inode", "timer",
                  "rqueue", "wqueue", "idle_recv_s", "idle_sent_s", "owner_pid", "owner_comm",
                  "owner_fd", "age_s", "age_lower_bound", "eof_age_s", "age_source")
# recordings made before age_source existed hold these
SOCKET_COLUMNS_V1 = SOCKET_COLUMNS[:-1]
ENDED_COLUMNS = ("netns", "role", "laddr", "lport", "raddr", "rport", "owner_pid", "owner_comm",
                 "end_reason", "time_wait")


@dataclass
class Evidence:
    sockets: pd.DataFrame
    ended: pd.DataFrame
    duration_s: float
    counter_deltas: dict[int, dict[str, int]] = field(default_factory=dict)
    sysctls: dict[int, dict[str, object]] = field(default_factory=dict)
    new_listeners: pd.DataFrame | None = None    # LISTEN sockets born during the observation
    # (netns, listener port) -> (SYN-ACK retransmits, distinct request sockets), from the trace
    synack: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    complete_snapshot: bool = True               # sockets include ESTABLISHED and TIME_WAIT
    # netns -> every listener there ("addr:port"): the per-namespace counters are theirs together
    counter_scope: dict[int, list[str]] = field(default_factory=dict)
    # the ended connections' health, per peer and owner (PeerTally.frames): TALLY_COLUMNS, and
    # their handshake and RTT times as histograms (TIMES_COLUMNS); None: not known
    ended_health: pd.DataFrame | None = None
    ended_times: pd.DataFrame | None = None


def sockets_frame(rows: list) -> pd.DataFrame:
    """Rows (tuples in SOCKET_COLUMNS order, or dicts) as the `sockets` frame, with its dtypes."""
    if isinstance(rows, pd.DataFrame) and "age_source" not in rows:
        rows = rows.assign(age_source=None)  # a recording from before the column
    df = pd.DataFrame(rows, columns=list(SOCKET_COLUMNS))
    src = df["age_source"].astype(object)
    df["age_source"] = src.where(src.notna(), None)
    for c in ("idle_recv_s", "idle_sent_s", "age_s", "eof_age_s"):
        df[c] = df[c].astype("float64")
    for c in ("owner_pid", "owner_fd"):
        df[c] = df[c].astype("Int64")
    return df


def sockets_matching(df: pd.DataFrame, filters=None) -> pd.DataFrame:
    """The rows of a sockets (or endings) frame that -p/-L/-D/-4/-6 keep (probes.filters.Filters)."""
    f = filters
    if f is None or not f.active() or df.empty:
        return df
    keep = pd.Series(True, index=df.index)
    if f.lports:
        keep &= df["lport"].isin(f.lports)
    if f.rports:
        keep &= df["rport"].isin(f.rports)
    if f.family:
        v6 = df["laddr"].astype(str).str.contains(":")
        keep &= v6 if f.family == 6 else ~v6
    if f.pids:
        keep &= df["owner_pid"].isin(f.pids).fillna(False).astype(bool)
    return df[keep.to_numpy(dtype=bool)]


def scoped_synack(synack: dict, kept: pd.DataFrame, filters=None) -> dict:
    """The SYN-ACK retransmit counts ((netns, listener port) -> counts) that the filters keep:
    those of listeners still in the filtered sockets frame `kept` (-p: the listener's owner,
    -L, -4/-6); none under -D, a listener having no remote port."""
    if filters is None or not filters.active():
        return synack
    if filters.rports:
        return {}
    lis = kept[kept["state"] == "LISTEN"]
    ours = {(int(n), int(p)) for n, p in zip(lis["netns"], lis["lport"])}
    return {k: v for k, v in synack.items() if (k[0], k[1]) in ours}


def scoped_counters(deltas: dict, everything: pd.DataFrame, kept: pd.DataFrame,
                    filters=None) -> tuple[dict, dict]:
    """(counter deltas the filters keep, netns -> the listeners those counters cover).
    A namespace's TcpExt counters cannot be split by port or process. Under a filter they
    count for a namespace only when they can be the kept listeners': every listener there
    passes the filter, or one that passes shows the trouble itself (its accept queue full now,
    or half-open request sockets); none under -D. A finding built on them names every listener
    of the namespace."""
    lis = everything[everything["state"] == "LISTEN"]
    scope = {int(ns): sorted(set(endpoints(g["laddr"], g["lport"]))) for ns, g in lis.groupby("netns")}
    if filters is None or not filters.active():
        return deltas, scope
    if filters.rports:
        return {}, scope
    mine = kept[kept["state"] == "LISTEN"]
    everyone = lis.groupby("netns").size()
    ours = mine.groupby("netns").size()
    whole = {int(ns) for ns, n in ours.items() if n == everyone.get(ns, 0)}
    full = mine[(mine["rqueue"] > 0) & (mine["rqueue"] >= mine["wqueue"])]
    reqs = kept[(kept["state"] == "SYN_RECV") & (kept["inode"] == 0)]
    mine_ports = set(zip(mine["netns"], mine["lport"]))
    shows = {int(n) for n in full["netns"]} | {int(n) for n, p in zip(reqs["netns"], reqs["lport"])
                                              if (n, p) in mine_ports}
    return {ns: d for ns, d in deltas.items() if int(ns) in whole | shows}, scope


def empty_sockets() -> pd.DataFrame:
    return sockets_frame([])


def empty_ended() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in ENDED_COLUMNS})


def endpoint(addr, port) -> str:
    if addr is None or (isinstance(addr, float) and np.isnan(addr)):
        return "?"
    a = str(addr)
    if port is None or port is pd.NA or (isinstance(port, float) and np.isnan(port)):
        port = "?"
    elif isinstance(port, (float, np.floating)):
        port = int(port)   # (a port column that held a NaN somewhere is float)
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


def endpoints(addrs: pd.Series, ports: pd.Series) -> list[str]:
    """endpoint() of each row, each distinct (address, port) spelled once."""
    a, p = np.asarray(addrs, dtype=object), np.asarray(ports, dtype=object)
    codes = pd.DataFrame({"a": a, "p": p}).groupby(["a", "p"], sort=False, dropna=False).ngroup().to_numpy()
    if not len(codes):
        return []
    first = np.zeros(codes.max() + 1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)
    names = np.array([endpoint(a[i], p[i]) for i in first], dtype=object)
    return list(names[codes])


# -- the ended connections' health, per peer (issue 15) ------------------------------------
# One rule for every path: ending_values() judges each ended connection from its columns (a
# live session's LIFE records or Lifecycles, a recording's lifecycles frame), PeerTally adds
# them up per peer and owner; the detectors below read its frames (Evidence.ended_health,
# Evidence.ended_times).

TALLY_KEYS = ("netns", "raddr", "owner_pid", "owner_comm")
TALLY_COUNTS = (
    "connections",      # ended connections
    "retransmitting",   # ... that re-sent data (resent above 0)
    "resent",           # data segments re-sent: total_retrans less the SYN retries where the health
                        # has it (0 when tcp:tcp_retransmit_skb counted none), else the retransmits
    "syn_retransmits",  # SYN retries (tcp:tcp_retransmit_skb in SYN_SENT)
    "losses",           # loss episodes (tcp:tcp_cong_state_set into Loss: retransmit timeouts)
    "share_resent",     # total_retrans of the connections whose health has it and data_segs_out...
    "share_sent",       # ...and their data_segs_out: the share of data segments re-sent
    "died",             # established, then a timeout, or a reset / abort after re-sending or a loss
    "timed_out", "reset", "aborted",  # died, by end reason
)
TALLY_COLUMNS = TALLY_KEYS + TALLY_COUNTS
TIME_METRICS = ("handshake_ms", "rtt_ms")
TIMES_COLUMNS = ("netns", "raddr", "owner_pid", "owner_comm", "metric", "bucket", "n")
# handshake and RTT times as log-spaced histograms: PER_DOUBLING buckets per doubling from 1 us
# (a bucket's value is within 4.5% of its samples), the last one open-ended (~2 min and up)
PER_DOUBLING = 8
TIME_BUCKETS = 27 * PER_DOUBLING


def time_buckets(ms: np.ndarray) -> np.ndarray:
    """Each time's histogram bucket (-1 for NaN: no sample)."""
    ms = np.asarray(ms, dtype=np.float64)
    ok = ~np.isnan(ms)
    us = np.where(ok, np.maximum(ms, 0.0) * 1000.0, 1.0)
    b = np.floor(np.log2(np.maximum(us, 1.0)) * PER_DOUBLING).astype(np.int64)
    return np.where(ok, np.clip(b, 0, TIME_BUCKETS - 1), -1)


def bucket_ms(bucket) -> np.ndarray:
    """A bucket's value (ms): the geometric middle of its span."""
    return 2.0 ** ((np.asarray(bucket, dtype=np.float64) + 0.5) / PER_DOUBLING) / 1000.0


def ending_values(*, established, timed_out, reset, aborted, retrans, syn_retrans, losses,
                  total_retrans, data_segs_out, rtt_ms, handshake_ms):
    """The one rule: per ended connection (numpy columns; counts -1 where not known, times
    NaN), its TALLY_COUNTS row and its handshake and RTT buckets. `reset`: reset_by_peer,
    `aborted`: local_abort, `timed_out`: end reason timeout; `established`: it got there."""
    n = len(established)
    retrans, syn_retrans, losses = (np.asarray(x, dtype=np.int64) for x in (retrans, syn_retrans, losses))
    total, sent = np.asarray(total_retrans, dtype=np.int64), np.asarray(data_segs_out, dtype=np.int64)
    # data re-sent: total_retrans counts the handshake's retries too (SYN, and an accepted
    # socket's SYN-ACKs): less the SYN retries, and none when the kernel counted no data retransmit
    resent = np.where(total >= 0, np.maximum(total - np.maximum(syn_retrans, 0), 0), np.maximum(retrans, 0))
    resent = np.where(retrans == 0, 0, resent)
    resending = resent > 0
    est = np.asarray(established, dtype=bool)
    to, rs, ab = (np.asarray(x, dtype=bool) & est for x in (timed_out, reset, aborted))
    after = resending | (losses > 0)
    rs, ab = rs & after, ab & after
    share = (total >= 0) & (sent >= 0)
    out = np.stack([np.ones(n, dtype=np.int64), resending.astype(np.int64), resent,
                    np.maximum(syn_retrans, 0), np.maximum(losses, 0),
                    np.where(share, total, 0), np.where(share, sent, 0),
                    (to | rs | ab).astype(np.int64), to.astype(np.int64), rs.astype(np.int64),
                    ab.astype(np.int64)], axis=1) if n else np.zeros((0, len(TALLY_COUNTS)), dtype=np.int64)
    return out, time_buckets(handshake_ms), time_buckets(rtt_ms)


class PeerTally:
    """ending_values() added up per (netns, raddr, owner_pid, owner_comm): counts, and the
    handshake and RTT histograms (sparse). max_keys: at most this many keys (a live session's
    memory); the connections of further keys are counted in `untallied` only."""

    def __init__(self, max_keys: int | None = None):
        self.counts: dict[tuple, np.ndarray] = {}
        self.times: dict[tuple, int] = {}  # (key, metric index, bucket) -> connections
        self.max_keys = max_keys
        self.untallied = 0

    def add(self, keys: list[tuple], index: np.ndarray, values, hs_bucket, rtt_bucket) -> None:
        """keys: the distinct keys; index: each connection's key (into keys); the rest as
        ending_values returns them."""
        index = np.asarray(index, dtype=np.int64)
        if not len(index):
            return
        room = None if self.max_keys is None else self.max_keys - len(self.counts)
        if room is not None:
            new = [i for i, k in enumerate(keys) if k not in self.counts]
            if len(new) > room:
                drop = np.zeros(len(keys), dtype=bool)
                drop[new[max(room, 0):]] = True
                out = drop[index]
                self.untallied += int(out.sum())
                keep = ~out
                index, values, hs_bucket, rtt_bucket = index[keep], values[keep], hs_bucket[keep], rtt_bucket[keep]
                if not len(index):
                    return
        sums = np.zeros((len(keys), len(TALLY_COUNTS)), dtype=np.int64)
        np.add.at(sums, index, values)
        for k, row in zip(keys, sums):
            have = self.counts.get(k)
            if have is None:
                self.counts[k] = row
            else:
                have += row
        for m, b in enumerate((hs_bucket, rtt_bucket)):
            ok = b >= 0
            if not ok.any():
                continue
            pairs, n = np.unique(index[ok] * TIME_BUCKETS + b[ok], return_counts=True)
            for p, c in zip(pairs.tolist(), n.tolist()):
                tk = (keys[p // TIME_BUCKETS], m, p % TIME_BUCKETS)
                self.times[tk] = self.times.get(tk, 0) + c

    def merge(self, other: "PeerTally") -> None:
        for k, row in other.counts.items():
            have = self.counts.get(k)
            self.counts[k] = row.copy() if have is None else have + row
        for k, n in other.times.items():
            self.times[k] = self.times.get(k, 0) + n
        self.untallied += other.untallied

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(Evidence.ended_health, Evidence.ended_times)."""
        keys = list(self.counts)
        health = pd.DataFrame(keys, columns=list(TALLY_KEYS)) if keys else \
            pd.DataFrame({c: [] for c in TALLY_KEYS})
        counts = np.stack([self.counts[k] for k in keys]) if keys else np.zeros((0, len(TALLY_COUNTS)), np.int64)
        for i, c in enumerate(TALLY_COUNTS):
            health[c] = counts[:, i]
        rows = [(*k, TIME_METRICS[m], b, n) for (k, m, b), n in self.times.items()]
        times = pd.DataFrame(rows, columns=list(TIMES_COLUMNS))
        for frame in (health, times):
            for c in ("netns", "raddr", "owner_pid", "owner_comm"):
                frame[c] = frame[c].astype(object)
        times["bucket"] = times["bucket"].astype(np.int64)
        times["n"] = times["n"].astype(np.int64)
        return health, times


def _na_int(s: pd.Series) -> np.ndarray:
    """An Int64 (or float) column as int64, -1 for NA."""
    return pd.to_numeric(s).astype("Float64").fillna(-1).to_numpy(dtype=np.float64).astype(np.int64)


def established_paths(paths: pd.Series) -> np.ndarray:
    """Which connections of a lifecycles frame got to ESTABLISHED (its `path` column)."""
    p = paths.astype(str)
    seen = {v: "ESTABLISHED" in v.split() for v in pd.unique(p)}
    return p.map(seen).to_numpy(dtype=bool)


def tally_frame(lc: pd.DataFrame) -> PeerTally:
    """A lifecycles frame's ended connections (the columns of a recording of schema 3 on) tallied:
    the offline side of the same rule. Without those columns, nothing."""
    t = PeerTally()
    done = lc[lc["end"].notna()] if "end" in lc else lc
    if "rtt_ms" not in done or not len(done):
        return t
    reason = done["end_reason"].astype(str).to_numpy()
    values = ending_values(
        established=established_paths(done["path"]), timed_out=reason == "timeout",
        reset=reason == "reset_by_peer", aborted=reason == "local_abort",
        retrans=_na_int(done["retransmits"]), syn_retrans=_na_int(done["syn_retransmits"]),
        losses=_na_int(done["losses"]), total_retrans=_na_int(done["total_retrans"]),
        data_segs_out=_na_int(done["data_segs_out"]),
        rtt_ms=pd.to_numeric(done["rtt_ms"]).astype("float64").to_numpy(),
        handshake_ms=pd.to_numeric(done["handshake_ms"]).astype("float64").to_numpy())
    keys = pd.DataFrame({"netns": done["netns"].astype(object), "raddr": done["raddr"].astype(object),
                         "owner_pid": done["pid"].astype(object), "owner_comm": done["comm"].astype(object)})
    keys = keys.where(keys.notna(), None)
    codes = keys.groupby(list(TALLY_KEYS), sort=False, dropna=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    distinct = [tuple(_plain(v) for v in row) for row in keys.iloc[first].itertuples(index=False, name=None)]
    t.add(distinct, codes, *values)
    return t


def _plain(v):
    """A key value as the live paths hold it: int, str or None."""
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    return str(v)
