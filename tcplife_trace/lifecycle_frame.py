"""The lifecycles frame from recorded events, with numpy on whole columns.

The rules are those of the live state machine (analysis/lifecycle.py): owners only
from process-context transitions, strongest source first; how it ended from the
events around the CLOSE. Rows are sorted by connection once; every per-connection
value is then a first/last/any over a contiguous segment. A test replays a real
trace both ways and checks they agree connection by connection.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from .analysis.lifecycle import RST_REASONS
from .frames import Columns, _decoded, _families, _masked, addresses
from .probes import decode as dec
from .probes.event_layout import EventKind
from .probes.tcp_states import TcpState as S
from .probes.tcp_states import state_name

END_CATEGORIES = ["active_close", "passive_close", "reset_by_peer", "local_abort", "refused",
                  "timeout", "listener_closed", "unknown", "open"]
ROLE_CATEGORIES = ["active", "passive", "listener", "unknown"]
SOURCES = ["connect", "listen", "io", "close", "listener", "none"]
ERRNO_NAMES = {32: "EPIPE", 104: "ECONNRESET", 110: "ETIMEDOUT", 111: "ECONNREFUSED"}


class _Segments:
    """Rows sorted by connection id, with each connection's first and last position."""

    def __init__(self, conn: np.ndarray):
        self.order = np.argsort(conn, kind="stable")
        c = conn[self.order]
        self.starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]]) if len(c) else np.zeros(0, np.int64)
        self.ends = np.r_[self.starts[1:] - 1, len(c) - 1] if len(c) else self.starts
        self.ids = c[self.starts]
        self.sorted_conn = c

    def first_where(self, mask_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(connection positions, sorted row positions) of each connection's first masked row."""
        idx = np.flatnonzero(mask_sorted)
        c = self.sorted_conn[idx]
        keep = np.r_[True, c[1:] != c[:-1]] if len(c) else np.zeros(0, bool)
        return np.searchsorted(self.ids, c[keep]), idx[keep]

    def last_where(self, mask_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask_sorted)
        c = self.sorted_conn[idx]
        keep = np.r_[c[1:] != c[:-1], True] if len(c) else np.zeros(0, bool)
        return np.searchsorted(self.ids, c[keep]), idx[keep]


def _per_conn(ids: np.ndarray, conn: np.ndarray, values: np.ndarray, last: bool = False):
    """Each id's first (or last) value among rows in time order; (positions, values)."""
    if last:
        conn, values = conn[::-1], values[::-1]
    uniq, first = np.unique(conn, return_index=True)
    pos = np.searchsorted(ids, uniq)
    ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == uniq) if len(ids) else pos < 0
    return pos[ok], values[first[ok]]


def lifecycles(table: pa.Table, mono_to_wall_ns: int, cols: Columns | None = None) -> pd.DataFrame:
    col = cols or Columns(table)
    kind, gen = col["kind"], col["gen"]
    is_state = (kind == EventKind.STATE) & (gen != 0)
    rows = np.flatnonzero(is_state)                      # table rows of state events
    seg = _Segments(gen[rows])
    srt = rows[seg.order]                                # table rows, sorted by connection
    ids, st, en = seg.ids, seg.starts, seg.ends
    n = len(ids)
    old, new = col["oldstate"][srt].astype(np.int64), col["newstate"][srt].astype(np.int64)
    ts = col["ts_ns"][srt].astype(np.int64)
    last_r = srt[en]

    # role: a birth fixes it; otherwise the last transition that tells
    fo, fn = old[st], new[st]
    birth = np.select([(fo == S.CLOSE) & (fn == S.SYN_SENT), (fo == S.CLOSE) & (fn == S.LISTEN),
                       (fo == S.LISTEN) & (fn == S.SYN_RECV)], [0, 2, 1], default=-1)
    hint = np.select([((old == S.LISTEN) & (new == S.CLOSE)) | (new == S.LISTEN),
                      (old == S.SYN_SENT) | (new == S.SYN_SENT), (old == S.SYN_RECV) | (new == S.SYN_RECV)],
                     [2, 0, 1], default=-1)
    role = np.full(n, 3)
    pos, i = seg.last_where(hint >= 0)
    role[pos] = hint[i]
    role = np.where(birth >= 0, birth, role)

    closed = new[en] == S.CLOSE
    birth_seen = birth >= 0
    start_ns, end_ns = ts[st], ts[en]

    # owners, strongest source first
    src = np.full(n, len(SOURCES) - 1)
    owner_row = np.full(n, -1)

    def offer(pos: np.ndarray, table_rows: np.ndarray, source: int) -> None:
        take = src[pos] > source
        src[pos[take]] = source
        owner_row[pos[take]] = table_rows[take]

    for (a, b), source in (((S.CLOSE, S.SYN_SENT), 0), ((S.CLOSE, S.LISTEN), 1)):
        pos, i = seg.first_where((old == a) & (new == b))
        offer(pos, srt[i], source)
    io_rows = np.flatnonzero((kind == EventKind.IO_OWNER) & (gen != 0))
    pos, r = _per_conn(ids, gen[io_rows], io_rows)
    offer(pos, r, 2)
    closer = (((old == S.ESTABLISHED) | (old == S.SYN_RECV)) & (new == S.FIN_WAIT1)) | \
        ((old == S.CLOSE_WAIT) & (new == S.LAST_ACK)) | ((old == S.LISTEN) & (new == S.CLOSE))
    pos, i = seg.first_where(closer)
    offer(pos, srt[i], 3)

    lport = np.maximum.reduceat(col["sport"][srt].astype(np.int64), st) if n else np.zeros(0, np.int64)
    rport = np.maximum.reduceat(col["dport"][srt].astype(np.int64), st) if n else np.zeros(0, np.int64)
    netns = col["netns"][last_r].astype(np.int64)
    netns_ok = (col["flags"][last_r] & dec.F_NETNS) != 0

    # accepted sockets: the owner of the listener open on that netns and port at birth
    listener_pid = np.full(n, -1)
    lis = np.flatnonzero((role == 2) & (src == 1))
    kids = np.flatnonzero((role == 1) & birth_seen)
    if len(lis) and len(kids):
        key = lambda idx: netns[idx] * 65536 + lport[idx]  # noqa: E731
        right = pd.DataFrame({"t": start_ns[lis], "k": key(lis), "lis": lis}).sort_values("t")
        left = pd.DataFrame({"t": start_ns[kids], "k": key(kids), "kid": kids}).sort_values("t")
        m = pd.merge_asof(left, right, on="t", by="k").dropna(subset=["lis"])
        li = m.lis.to_numpy(dtype=np.int64)
        kid = m.kid.to_numpy()
        alive = ~closed[li] | (end_ns[li] >= m.t.to_numpy())
        kid, li = kid[alive], li[alive]
        listener_pid[kid] = col["pid"][owner_row[li]]
        offer(kid, owner_row[li], 4)
    pid = np.where(owner_row >= 0, col["pid"][np.maximum(owner_row, 0)], 0)

    # how it ended, from the events around the CLOSE
    before = np.where(closed, old[en], 0)
    rr = np.isin(ids, gen[(kind == EventKind.RECV_RESET)])
    rs_rows = np.flatnonzero((kind == EventKind.SEND_RESET) & (gen != 0))
    rst_sent = np.full(n, -1)
    pos, v = _per_conn(ids, gen[rs_rows], col["value"][rs_rows], last=True)
    rst_sent[pos] = v
    er_rows = np.flatnonzero((kind == EventKind.ERROR) & (gen != 0))
    errno = np.full(n, -1)
    pos, v = _per_conn(ids, gen[er_rows], col["value"][er_rows], last=True)
    errno[pos] = v
    reason = np.select(
        [role == 2, ~closed, (rr | (errno == 111)) & (before == S.SYN_SENT), rr | (errno == 111),
         errno == 110, rst_sent >= 0, (errno == 104) | (errno == 32), before == S.LAST_ACK,
         (before == S.FIN_WAIT2) | (before == S.CLOSING), (before == S.SYN_SENT) | (before == S.SYN_RECV)],
        [6, 8, 4, 2, 5, 3, 2, 1, 0, 3], default=7)

    eof_rows = np.flatnonzero(((kind == EventKind.EOF) | (kind == EventKind.IO_OWNER)) & (gen != 0)
                              & ((col["flags"] & dec.F_EOF) != 0))
    eof_ns = np.full(n, -1)
    pos, v = _per_conn(ids, gen[eof_rows], col["ts_ns"][eof_rows].astype(np.int64))
    eof_ns[pos] = v

    # missed events: a transition whose old state is not where the previous one led
    gap = np.r_[False, new[:-1] != old[1:]] if len(old) else np.zeros(0, bool)
    gap[st] = False
    incomplete = np.logical_or.reduceat(gap, st) if n else np.zeros(0, bool)

    paths = _paths(old, new, st, en)

    has_owner = owner_row >= 0
    comm = _decoded(table["comm"].take(pa.array(owner_row[has_owner], type=pa.int64())), dec.comm)
    owner_comm = comm.take(np.where(has_owner, np.cumsum(has_owner) - 1, -1), allow_fill=True)
    last_af = col["family"][last_r]  # addresses and family from each connection's last transition
    tx_ok = (col["flags"][last_r] & dec.F_BYTES) != 0
    uid_ok = (col["flags"][last_r] & dec.F_UID) != 0
    to_time = lambda v, ok: pd.to_datetime(np.where(ok, v + mono_to_wall_ns, 0), unit="ns", utc=True) \
        .where(ok)  # noqa: E731
    frame = pd.DataFrame({
        "conn_id": ids.astype(np.uint64),
        "role": pd.Categorical.from_codes(role, ROLE_CATEGORIES),
        "family": _families(col["daddr"][last_r], last_af),
        "laddr": addresses(col["saddr"][last_r], last_af), "lport": _masked(lport, lport != 0, "UInt16"),
        "raddr": addresses(col["daddr"][last_r], last_af), "rport": _masked(rport, rport != 0, "UInt16"),
        "netns": _masked(netns, netns_ok, "UInt32"),
        "birth_seen": birth_seen,
        "start": to_time(start_ns, np.ones(n, bool)),
        "end": to_time(end_ns, closed),
        "duration_s": np.where(closed & birth_seen, (end_ns - start_ns) / 1e9, np.nan),
        "listener_pid": _masked(listener_pid, listener_pid >= 0, "UInt32"),
        "pid": _masked(pid, owner_row >= 0, "UInt32"),
        "comm": owner_comm,
        "owner_source": pd.Categorical.from_codes(src, SOURCES),
        "uid": _masked(col["uid"][last_r], uid_ok, "UInt32"),
        "end_reason": pd.Categorical.from_codes(reason, END_CATEGORIES),
        "rst_sent_reason": _named(rst_sent, lambda v: RST_REASONS.get(v, str(v))),
        "errno": _named(errno, lambda v: ERRNO_NAMES.get(v, str(v))),
        "time_wait": reason == 0,
        "tx_b": _masked(col["tx_b"][last_r], tx_ok, "UInt64"),
        "rx_b": _masked(col["rx_b"][last_r], tx_ok, "UInt64"),
        "eof_seen": to_time(eof_ns, eof_ns >= 0),
        "incomplete": incomplete,
        "path": paths,
    })
    return frame


def _paths(old: np.ndarray, new: np.ndarray, st: np.ndarray, en: np.ndarray) -> pd.Categorical:
    """'CLOSE SYN_SENT ESTABLISHED ...' per connection, as a categorical: connections are
    hashed by their state sequence (two independent polynomial hashes), and each distinct
    sequence is spelled out once."""
    n, m = len(st), len(new)
    if not n:
        return pd.Categorical([])
    pos = np.arange(m) - np.repeat(st, en - st + 1)
    h = []
    for base in (np.uint64(1_000_003), np.uint64(2_147_483_647)):
        powers = np.ones(int(pos.max()) + 2, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(1, len(powers)):
                powers[i] = powers[i - 1] * base
            term = (new.astype(np.uint64) + np.uint64(1)) * powers[pos + 1]
            h.append(np.add.reduceat(term, st) + old[st].astype(np.uint64))
    c1, _ = pd.factorize(h[0])
    c2, u2 = pd.factorize(h[1])
    codes, uniq = pd.factorize(c1.astype(np.int64) * max(len(u2), 1) + c2)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[codes[::-1]] = np.arange(n - 1, -1, -1)
    names = [" ".join(state_name(int(s)) for s in [old[st[c]], *new[st[c]:en[c] + 1]]) for c in first]
    return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype=object))


def _named(values: np.ndarray, name) -> pd.Categorical:
    """Small integer codes (-1 = none) -> a categorical of their names."""
    present = np.unique(values[values >= 0])
    codes = np.searchsorted(present, values)
    return pd.Categorical.from_codes(np.where(values >= 0, codes, -1),
                                     categories=[name(int(v)) for v in present])
