"""The lifecycles frame from recorded events, with numpy on whole columns.

The rules are those of the live state machine (analysis/lifecycle.py): owners only
from process-context transitions, strongest source first; how it ended from the
events around the CLOSE. Rows are sorted by connection once; every per-connection
value is then a first/last/any over a contiguous segment. A test replays a real
trace both ways and checks they agree connection by connection.
"""
from __future__ import annotations

import errno as errno_mod

import numpy as np
import pandas as pd
import pyarrow as pa

from .analysis.lifecycle import (ECONNREFUSED, ECONNRESET, END_REASONS, EPIPE, ETIMEDOUT, OWNER_SOURCES,
                                 ROLES, RST_REASONS)
from .frames import Columns, _decoded, dropped_by_filter, _families, _masked, addresses, first_rows, spelled, wall_times
from .probes import decode as dec
from .probes.event_layout import EventKind
from .probes.tcp_states import TcpState as S
from .probes.tcp_states import state_name

# the live state machine's vocabularies; codes below are positions in these lists
END_CATEGORIES = [*END_REASONS, "open"]
ROLE_CATEGORIES = list(ROLES)
SOURCES = list(OWNER_SOURCES)
_END = {name: i for i, name in enumerate(END_CATEGORIES)}
_ROLE = {name: i for i, name in enumerate(ROLE_CATEGORIES)}
_SRC = {name: i for i, name in enumerate(SOURCES)}


class _Segments:
    """Rows sorted by connection id, with each connection's first and last position."""

    def __init__(self, conn: np.ndarray):
        self.order = np.argsort(conn, kind="stable")
        c = conn[self.order]
        self.starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]]) if len(c) else np.zeros(0, np.int64)
        self.ends = np.r_[self.starts[1:] - 1, len(c) - 1] if len(c) else self.starts
        self.ids = c[self.starts]
        self.sorted_conn = c

    def where(self, mask_sorted: np.ndarray, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(connection positions, sorted row positions) of each connection's first (or last)
        masked row."""
        idx = np.flatnonzero(mask_sorted)
        c = self.sorted_conn[idx]
        change = c[1:] != c[:-1]
        keep = (np.r_[change, True] if last else np.r_[True, change]) if len(c) else np.zeros(0, bool)
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
    is_state = (kind == EventKind.STATE) & (gen != 0) & ~dropped_by_filter(col)
    rows = np.flatnonzero(is_state)                      # table rows of state events
    seg = _Segments(gen[rows])
    srt = rows[seg.order]                                # table rows, sorted by connection
    ids, st, en = seg.ids, seg.starts, seg.ends
    n = len(ids)
    old, new = col["oldstate"][srt].astype(np.int16), col["newstate"][srt].astype(np.int16)  # states < 16
    ts = col["ts_ns"][srt].view(np.int64)
    lport = np.maximum.reduceat(col["sport"][srt], st) if n else np.zeros(0, np.uint16)
    rport = np.maximum.reduceat(col["dport"][srt], st) if n else np.zeros(0, np.uint16)
    last_r = srt[en]

    # role: a birth fixes it; otherwise the last transition that tells
    fo, fn = old[st], new[st]
    birth = np.select([(fo == S.CLOSE) & (fn == S.SYN_SENT), (fo == S.CLOSE) & (fn == S.LISTEN),
                       (fo == S.LISTEN) & (fn == S.SYN_RECV)],
                      [_ROLE["active"], _ROLE["listener"], _ROLE["passive"]], default=-1)
    hint = np.select([((old == S.LISTEN) & (new == S.CLOSE)) | (new == S.LISTEN),
                      (old == S.SYN_SENT) | (new == S.SYN_SENT), (old == S.SYN_RECV) | (new == S.SYN_RECV)],
                     [_ROLE["listener"], _ROLE["active"], _ROLE["passive"]], default=-1)
    role = np.full(n, _ROLE["unknown"])
    pos, i = seg.where(hint >= 0, last=True)
    role[pos] = hint[i]
    role = np.where(birth >= 0, birth, role)

    closed = new[en] == S.CLOSE
    birth_seen = birth >= 0
    start_ns, end_ns = ts[st], ts[en]

    # owners, strongest source first
    src = np.full(n, _SRC["none"])
    owner_row = np.full(n, -1)

    def offer(pos: np.ndarray, table_rows: np.ndarray, source: int) -> None:
        take = src[pos] > source
        src[pos[take]] = source
        owner_row[pos[take]] = table_rows[take]

    for (a, b), source in (((S.CLOSE, S.SYN_SENT), _SRC["connect"]), ((S.CLOSE, S.LISTEN), _SRC["listen"])):
        pos, i = seg.where((old == a) & (new == b))
        offer(pos, srt[i], source)
    io_rows = np.flatnonzero((kind == EventKind.IO_OWNER) & (gen != 0))
    pos, r = _per_conn(ids, gen[io_rows], io_rows)
    offer(pos, r, _SRC["io"])
    closer = (((old == S.ESTABLISHED) | (old == S.SYN_RECV)) & (new == S.FIN_WAIT1)) | \
        ((old == S.CLOSE_WAIT) & (new == S.LAST_ACK)) | ((old == S.LISTEN) & (new == S.CLOSE))
    pos, i = seg.where(closer)
    offer(pos, srt[i], _SRC["close"])

    netns = col["netns"][last_r].astype(np.int64)
    netns_ok = (col["flags"][last_r] & dec.F_NETNS) != 0

    # accepted sockets: the owner of the listener open on that netns and port at birth
    listener_pid = np.full(n, -1)
    lis = np.flatnonzero((role == _ROLE["listener"]) & (src == _SRC["listen"]))
    kids = np.flatnonzero((role == _ROLE["passive"]) & birth_seen)
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
        offer(kid, owner_row[li], _SRC["listener"])
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
    # the order of analysis.lifecycle.classify_end
    rules = [
        (role == _ROLE["listener"], "listener_closed"),
        (~closed, "open"),
        ((rr | (errno == ECONNREFUSED)) & (before == S.SYN_SENT), "refused"),
        (rr | (errno == ECONNREFUSED), "reset_by_peer"),
        (errno == ETIMEDOUT, "timeout"),
        (rst_sent >= 0, "local_abort"),
        ((errno == ECONNRESET) | (errno == EPIPE), "reset_by_peer"),
        (before == S.LAST_ACK, "passive_close"),
        ((before == S.FIN_WAIT2) | (before == S.CLOSING), "active_close"),
        ((before == S.SYN_SENT) | (before == S.SYN_RECV), "local_abort"),
    ]
    reason = np.select([cond for cond, _ in rules], [_END[name] for _, name in rules],
                       default=_END["unknown"])

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
    to_time = lambda v, ok: wall_times(np.where(ok, v + mono_to_wall_ns, 0)).where(ok)  # noqa: E731
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
        "errno": _named(errno, lambda v: errno_mod.errorcode.get(v, str(v))),
        "time_wait": reason == _END["active_close"],
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
    return spelled(codes, [" ".join(state_name(int(s)) for s in [old[st[c]], *new[st[c]:en[c] + 1]])
                           for c in first_rows(codes, len(uniq))])


def _named(values: np.ndarray, name) -> pd.Categorical:
    """Small integer codes (-1 = none) -> a categorical of their names."""
    present = np.unique(values[values >= 0])
    codes = np.searchsorted(present, values)
    return pd.Categorical.from_codes(np.where(values >= 0, codes, -1),
                                     categories=[name(int(v)) for v in present])
