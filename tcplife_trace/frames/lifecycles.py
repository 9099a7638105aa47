"""The lifecycles frame from recorded events, with numpy on whole columns.

The rules are those of the live state machine (analysis/lifecycle.py): owners only
from process-context transitions, strongest source first; how it ended from the
events around the CLOSE, by the same table (analysis/end_rules.py). Rows are sorted by connection once; every per-connection
value is then a first/last/any over a contiguous segment. A test replays a real
trace both ways and checks they agree connection by connection.
"""
from __future__ import annotations

import errno as errno_mod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa

from tcplife_trace.analysis import end_rules
from tcplife_trace.analysis.lifecycle import DEFAULT_HOLD_NS
from .. import containers
from tcplife_trace.analysis.rules import ACTING, BIRTHS, END_REASONS, HANDSHAKE_STATE, OWNER_SOURCES, ROLE_HINTS, ROLES, SRC_NONE
from .by_connection import _dropped
from .columns import Columns, _families, _masked, addresses, decoded, factorize, first_rows, spelled, wall_times
from tcplife_trace.probes import decode as dec
from tcplife_trace.probes import health
from tcplife_trace.probes.btf import TCP_SOCK_HEALTH
from tcplife_trace.probes.event_layout import EventKind, LifeFlag
from tcplife_trace.probes.tcp_states import TcpState as S
from tcplife_trace.probes.tcp_states import state_name

# the live state machine's vocabularies; codes below are positions in these lists
END_CATEGORIES = [*END_REASONS, "open"]
ROLE_CATEGORIES = list(ROLES)
SOURCES = list(OWNER_SOURCES)
_END = {name: i for i, name in enumerate(END_CATEGORIES)}
_ROLE = {name: i for i, name in enumerate(ROLE_CATEGORIES)}
_SRC = {name: i for i, name in enumerate(SOURCES)}
NAT = np.iinfo(np.int64).min  # numpy's not-a-time, as int64


def _per_conn(ids: np.ndarray, conn: np.ndarray, values: np.ndarray, last: bool = False):
    """Each id's first (or last) value among rows in time order; (positions, values)."""
    if last:
        conn, values = conn[::-1], values[::-1]
    uniq, first = np.unique(conn, return_index=True)
    pos = np.searchsorted(ids, uniq)
    ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == uniq) if len(ids) else pos < 0
    return pos[ok], values[first[ok]]


def lifecycles(table: pa.Table, mono_to_wall_ns: int, cols: Columns | None = None,
               rst_reasons: list | None = None, lives: pa.Table | None = None) -> pd.DataFrame:
    """rst_reasons: the reset reason table (end_rules.ResetReasons) of each recording file, in
    the file order of the connection ids' top 16 bits (Recording._combine); default this kernel's.
    lives: the connections' fold extras (recording.LIVES_TYPES rows; None or empty: all NA)."""
    col = cols or Columns(table)
    kind = col["kind"]

    def events(*kinds: int, flag: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(table rows, connection ids) of the events of these kinds that have an id."""
        m = kind == kinds[0]
        for k in kinds[1:]:
            m |= kind == k
        if flag:
            m &= (col["flags"] & flag) != 0
        r = np.flatnonzero(m)
        g = seg.ids_of(r, col.at("gen", r, ascending=True))
        return r[g != 0], g[g != 0]
    seg = col.by_connection()                            # state changes, sorted by connection
    ids, st, en = seg.ids, seg.starts, seg.ends
    n = len(ids)
    old, new = seg.old, seg.new
    last_r = seg.table_rows(en)
    # the addresses, family, netns, uid and byte counts of each last transition, how each
    # connection ended and its state path, on a second thread (numpy and Arrow release the
    # GIL) while this one does the rest
    pool = ThreadPoolExecutor(1)
    last = pool.submit(_last_values, col, last_r)
    lport = np.maximum.reduceat(seg.sorted_column("sport"), st) if n else np.zeros(0, np.uint16)
    rport = np.maximum.reduceat(seg.sorted_column("dport"), st) if n else np.zeros(0, np.uint16)

    # role: a birth fixes it; otherwise the last transition that tells
    fo, fn = old[st], new[st]
    birth = np.select([(fo == a) & (fn == b) for a, b in BIRTHS],
                      [_ROLE[r] for r in BIRTHS.values()], default=-1).astype(np.int8)
    role = birth.copy()
    unborn = np.flatnonzero(np.repeat(birth < 0, en - st + 1))  # positions of connections without
    if len(unborn):                                              # a birth (few): look at them all
        o, w = old[unborn], new[unborn]
        hint = np.select([test(o, w) for _, test in ROLE_HINTS], [_ROLE[r] for r, _ in ROLE_HINTS], default=-1)
        pos, i = seg.where(hint >= 0, last=True, idx=unborn)
        role[pos] = hint[np.searchsorted(unborn, i)]
    role[role < 0] = _ROLE["unknown"]

    closed = new[en] == S.CLOSE
    birth_seen = birth >= 0
    start_ns, end_ns = seg.times(st), seg.times(en)
    # seen first through a read or write (or a reset, an EOF) before any state change: it
    # started there, as the Tracker starts it; one never seen changing state is added below
    io_rows, io_ids = events(EventKind.IO_OWNER)
    io_ids, first = np.unique(io_ids, return_index=True)
    io_rows = io_rows[first]                             # each one's first read or write
    o_rows, o_ids = events(EventKind.EOF, EventKind.RECV_RESET)  # (few)
    o_ids, first = np.unique(o_ids, return_index=True)
    o_rows = o_rows[first]
    j = np.minimum(np.searchsorted(io_ids, o_ids), max(len(io_ids) - 1, 0))
    dup = (io_ids[j] == o_ids) if len(io_ids) else np.zeros(len(o_ids), bool)
    seen_ids, seen_rows = np.r_[io_ids, o_ids[~dup]], np.r_[io_rows, o_rows[~dup]]
    seen_rows[j[dup]] = np.minimum(seen_rows[j[dup]], o_rows[dup])
    at_seen = np.minimum(np.searchsorted(ids, seen_ids), max(n - 1, 0))
    changed = (ids[at_seen] == seen_ids) if n else np.zeros(len(seen_ids), bool)
    late = changed & ~birth_seen[at_seen] if n else changed
    unborn_at, t = at_seen[late], col.at("ts_ns", seen_rows[late]).view(np.int64)
    earlier = t < start_ns[unborn_at]
    start_ns[unborn_at[earlier]] = t[earlier]
    # ended without a CLOSE: destroyed, or (map full) its address born again, as the Tracker ends them
    d_rows, d_ids = events(EventKind.DESTROY)
    gone_ids = np.r_[d_ids.astype(np.uint64), seg.entryless_ends[0]]
    gone_ts = np.r_[col.at("ts_ns", d_rows, ascending=True).view(np.int64), seg.entryless_ends[1]]
    gone = np.zeros(n, bool)
    pos, v = _per_conn(ids, gone_ids, gone_ts)
    take = ~closed[pos]
    gone[pos[take]] = True
    end_ns = end_ns.copy()
    end_ns[pos[take]] = v[take]
    closed = closed | gone
    ended = pool.submit(_endings, col, events, seg, role, closed, gone, end_ns, lport, rport, mono_to_wall_ns,
                        rst_reasons)
    paths = pool.submit(_paths, old, new, st, en)
    pool.shutdown(wait=False)  # (the thread ends when the three are done)

    # owners, strongest source first
    src = np.full(n, _SRC["none"], dtype=np.int8)
    owner_row = np.full(n, -1, dtype=seg.frame_rows.dtype)

    def offer(pos: np.ndarray, table_rows: np.ndarray, source: int) -> None:
        take = src[pos] > source
        src[pos[take]] = source
        owner_row[pos[take]] = table_rows[take]

    def acting(source: str) -> None:  # the first transition per connection that acts by this source
        mask = np.zeros(len(old), dtype=bool)
        for (a, b), s in ACTING.items():
            if s == source:
                mask |= (old == a) & (new == b)
        pos, i = seg.where(mask)
        offer(pos, seg.table_rows(i), _SRC[source])

    acting("connect")
    acting("listen")
    k = changed[:len(io_ids)]
    offer(at_seen[:len(io_ids)][k], io_rows[k], _SRC["io"])  # the first read or write
    acting("close")

    # accepted sockets: the owner of the listener open on that netns and port at birth
    listener_pid = np.full(n, -1, dtype=np.int64)
    lis = np.flatnonzero((role == _ROLE["listener"]) & (src == _SRC["listen"]))
    kids = np.flatnonzero((role == _ROLE["passive"]) & birth_seen)
    if len(lis) and len(kids):
        netns = last.result()["netns_raw"]
        key = lambda idx: netns[idx] * 65536 + lport[idx]  # noqa: E731
        right = pd.DataFrame({"t": start_ns[lis], "k": key(lis), "lis": lis}).sort_values("t")
        left = pd.DataFrame({"t": start_ns[kids], "k": key(kids), "kid": kids}).sort_values("t")
        m = pd.merge_asof(left, right, on="t", by="k").dropna(subset=["lis"])
        li = m.lis.to_numpy(dtype=np.int64)
        kid = m.kid.to_numpy()
        alive = ~closed[li] | (end_ns[li] >= m.t.to_numpy())
        kid, li = kid[alive], li[alive]
        listener_pid[kid] = col.at("pid", owner_row[li])
        offer(kid, owner_row[li], _SRC["listener"])
    has_owner = owner_row >= 0
    at_owner = col.gather(owner_row[has_owner])         # values of each owner's event
    pid = np.zeros(n, np.uint32)
    pid[has_owner] = at_owner("pid")

    owner_comm = decoded(at_owner, "comm", dec.comm).take(np.where(has_owner, np.cumsum(has_owner) - 1, -1),
                                                          allow_fill=True)
    last, end = last.result(), ended.result()
    to_time = lambda v, ok: wall_times(np.where(ok, v + mono_to_wall_ns, NAT))  # noqa: E731
    frame = pd.DataFrame(copy=False, data={
        "conn_id": ids.astype(np.uint64),
        "role": pd.Categorical.from_codes(role, ROLE_CATEGORIES),
        "family": last["family"],
        "laddr": last["laddr"], "lport": _masked(lport, lport != 0, "UInt16"),
        "raddr": last["raddr"], "rport": _masked(rport, rport != 0, "UInt16"),
        "netns": last["netns"],
        "birth_seen": birth_seen,
        "start": to_time(start_ns, np.ones(n, bool)),
        "end": to_time(end_ns, closed),
        "duration_s": np.where(closed & birth_seen, (end_ns - start_ns) / 1e9, np.nan),
        "listener_pid": _masked(listener_pid, listener_pid >= 0, "UInt32"),
        "pid": _masked(pid, owner_row >= 0, "UInt32"),
        "comm": owner_comm,
        "owner_source": pd.Categorical.from_codes(src, SOURCES),
        "uid": last["uid"],
        "end_reason": end["end_reason"],
        "end_detail": end["end_detail"],
        "rst_sent_reason": end["rst_sent_reason"],
        "errno": end["errno"],
        "time_wait": end["time_wait"],
        "tx_b": last["tx_b"],
        "rx_b": last["rx_b"],
        "eof_seen": end["eof_seen"],
        "incomplete": end["incomplete"],
        "path": paths.result(),
        "handshake_ms": _handshakes(seg, role, n),
    })
    unchanged = ~changed
    if unchanged.any():
        d_gone = np.r_[d_ids.astype(np.uint64), seg.entryless_ends[0]]
        keep = ~np.isin(seen_ids[unchanged], d_gone)  # destroyed without a state change: never connected
        rows_, ids_ = seen_rows[unchanged][keep], seen_ids[unchanged][keep]
        dropped = _dropped(col, ids_)
        if dropped is not None:
            rows_, ids_ = rows_[~dropped], ids_[~dropped]
        if len(ids_):
            frame = _with_rows(frame, _io_only(col, events, rows_, ids_, mono_to_wall_ns))
    return _with_fold_extras(frame, lives)


def _handshakes(seg, role: np.ndarray, n: int) -> np.ndarray:
    """Each connection's handshake ms (analysis/rules.py HANDSHAKE_STATE: the time in SYN_SENT
    of a client, SYN_RECV of an accepted socket, when it was left for ESTABLISHED); NaN if none."""
    out = np.full(n, np.nan)
    if not n:
        return out
    pos, ns = seg.time_in_old()
    c = seg.number[pos]
    o, w, r = seg.old[pos], seg.new[pos], role[c]
    hs = np.zeros(len(pos), bool)
    for name, st in HANDSHAKE_STATE.items():
        hs |= (r == _ROLE[name]) & (o == st)
    hs &= w == S.ESTABLISHED
    out[c[hs][::-1]] = ns[hs][::-1] / 1e6  # (the first per connection)
    return out


# the columns the kernel's fold adds (recording.LIVES_TYPES -> frame), NA without a LIFE record
FOLD_COLUMNS = ("retransmits", "syn_retransmits", "recoveries", "losses", *health.COLUMNS, *containers.COLUMNS)


def _with_fold_extras(frame: pd.DataFrame, lives: pa.Table | None) -> pd.DataFrame:
    """frame with FOLD_COLUMNS from each connection's LIFE record (by conn_id; the last if more)."""
    n = len(frame)
    out = {}
    if lives is None or not lives.num_rows or not n:
        for c in FOLD_COLUMNS:
            out[c] = pd.Series([None] * n, index=frame.index, dtype=object)
        return frame.assign(**out)
    conn = lives["conn_id"].to_numpy()
    ids = frame["conn_id"].to_numpy(dtype=np.uint64)
    last = len(conn) - 1 - np.unique(conn[::-1], return_index=True)[1]  # each id's last record
    conn = conn[last]
    at = np.minimum(np.searchsorted(conn, ids), len(conn) - 1)
    has = conn[at] == ids
    rows = last[at]

    def get(name):
        return lives[name].to_numpy()[rows]

    lflags = get("lflags")
    counted = has & ((lflags & int(LifeFlag.RETRANS)) != 0)
    cong = has & ((lflags & int(LifeFlag.CONG)) != 0)
    out["retransmits"] = _masked(get("retrans").astype(np.int64), counted, "Int64")
    out["syn_retransmits"] = _masked(get("syn_retrans").astype(np.int64), counted, "Int64")
    out["recoveries"] = _masked(get("recoveries").astype(np.int64), cong, "Int64")
    out["losses"] = _masked(get("losses").astype(np.int64), cong, "Int64")
    mask = np.where(has, get("health_mask"), 0)
    values = np.stack([get(f"h_{nm}") for nm in TCP_SOCK_HEALTH], axis=1)
    for c, (v, ok) in health.fold_columns(mask, values).items():
        out[c] = pd.Series(v, index=frame.index).where(ok) if v.dtype.kind == "f" else \
            pd.Series(pd.array(v, dtype="Int64"), index=frame.index).where(ok)
    cg = get("cgroup_id")
    owned = has & (get("owner_src") < SRC_NONE) & (cg != 0)
    out["cgroup_id"] = _masked(cg, owned, "UInt64")
    paths = lives["cgroup"].to_pylist()
    homes: dict = {}
    for c in containers.COLUMNS[1:]:
        out[c] = [None] * n
    for i in np.flatnonzero(owned).tolist():
        p = paths[rows[i]]
        if p is None:
            continue
        h = homes.get(p)
        if h is None:
            h = homes[p] = containers.classify(p).columns()
        for c in containers.COLUMNS[2:]:
            out[c][i] = h[c]
        out["cgroup"][i] = p
    for c in containers.COLUMNS[1:]:
        out[c] = pd.Series(out[c], index=frame.index, dtype=object)
    return frame.assign(**out)


def with_open_health(frame: pd.DataFrame, sockets: pd.DataFrame | None, rows: np.ndarray | None = None) -> pd.DataFrame:
    """frame with the health columns (probes/health.COLUMNS) of its still-open rows (end_reason
    open, and no health from the kernel's fold) taken from a snapshot's sockets (a recording's
    last look, with tcp_info: recordings since issue 15), joined on views.OPEN_HEALTH_KEY, as a
    live session does (Session.open_health). rows: only these rows may take it (a mask)."""
    from ..render.views import OPEN_HEALTH_KEY
    if sockets is None or not len(sockets) or not len(frame) or health.COLUMNS[0] not in sockets:
        return frame
    want = (frame["end_reason"] == "open").to_numpy(dtype=bool) & frame[list(health.COLUMNS)].isna().all(axis=1).to_numpy()
    if rows is not None:
        want &= rows
    if not want.any():
        return frame
    socks = sockets[sockets[list(health.COLUMNS)].notna().any(axis=1)]
    if not len(socks):
        return frame

    def keys(df):
        return pd.MultiIndex.from_arrays([df[k].astype(object).where(df[k].notna(), None).to_numpy()
                                          for k in OPEN_HEALTH_KEY])
    socks = socks[~keys(socks).duplicated(keep="last")]
    at = keys(socks).get_indexer(keys(frame[want]))
    found = at >= 0
    if not found.any():
        return frame
    idx = frame.index[want][found]
    out = frame.copy()
    for c in health.COLUMNS:
        out.loc[idx, c] = socks[c].to_numpy()[at[found]]
    return out


def _io_only(col: Columns, events, rows: np.ndarray, ids: np.ndarray, mono_to_wall_ns: int) -> pd.DataFrame:
    """Rows for connections the trace saw only through reads and writes (or a reset, an EOF),
    never a state change: sockets open before the trace that stayed open, as the Tracker
    keeps them (role unknown, no birth, no tuple: these events carry none; the owner, uid and
    netns from the first read or write). rows: each one's first such event."""
    n = len(ids)
    io_rows, io_ids = events(EventKind.IO_OWNER)
    pos, first_io = _per_conn(ids, io_ids, io_rows)
    owner_row = np.full(n, -1, dtype=np.int64)
    owner_row[pos] = first_io
    has = owner_row >= 0
    at_owner = col.gather(owner_row[has])
    pid = np.zeros(n, np.uint32)
    pid[has] = at_owner("pid")
    comm = decoded(at_owner, "comm", dec.comm).take(np.where(has, np.cumsum(has) - 1, -1), allow_fill=True)
    flags = np.zeros(n, np.uint8)
    flags[has] = col["flags"][owner_row[has]]
    netns = np.zeros(n, np.int64)
    uid = np.zeros(n, np.uint32)
    if has.any():
        netns[has] = at_owner("netns")
        uid[has] = at_owner("uid")
    eof_rows, eof_ids = events(EventKind.EOF, EventKind.IO_OWNER, flag=dec.F_EOF)
    eof_ns = np.full(n, NAT, dtype=np.int64)
    pos, v = _per_conn(ids, eof_ids, col.at("ts_ns", eof_rows, ascending=True).view(np.int64))
    eof_ns[pos] = v + mono_to_wall_ns
    start = col.at("ts_ns", rows).view(np.int64) + mono_to_wall_ns
    none = np.zeros(n, bool)
    no_names = lambda: pd.Categorical.from_codes(np.full(n, -1, np.int8), categories=pd.Index([], dtype=object))  # noqa: E731
    order = np.argsort(ids, kind="stable")
    return pd.DataFrame(copy=False, data={
        "conn_id": ids.astype(np.uint64),
        "role": pd.Categorical.from_codes(np.full(n, _ROLE["unknown"], np.int8), ROLE_CATEGORIES),
        "family": _masked(np.zeros(n, np.uint8), none, "UInt8"),
        "laddr": no_names(), "lport": _masked(np.zeros(n), none, "UInt16"),
        "raddr": no_names(), "rport": _masked(np.zeros(n), none, "UInt16"),
        "netns": _masked(netns, has & ((flags & dec.F_NETNS) != 0), "UInt32"),
        "birth_seen": none,
        "start": wall_times(start), "end": wall_times(np.full(n, NAT, np.int64)),
        "duration_s": np.full(n, np.nan),
        "listener_pid": _masked(np.zeros(n), none, "UInt32"),
        "pid": _masked(pid, has, "UInt32"),
        "comm": comm,
        "owner_source": pd.Categorical.from_codes(np.where(has, _SRC["io"], _SRC["none"]).astype(np.int8), SOURCES),
        "uid": _masked(uid, has & ((flags & dec.F_UID) != 0), "UInt32"),
        "end_reason": pd.Categorical.from_codes(np.full(n, _END["open"], np.int8), END_CATEGORIES),
        "end_detail": no_names(), "rst_sent_reason": no_names(), "errno": no_names(),
        "time_wait": none, "tx_b": _masked(np.zeros(n), none, "UInt64"), "rx_b": _masked(np.zeros(n), none, "UInt64"),
        "eof_seen": wall_times(eof_ns), "incomplete": none,
        "path": pd.Categorical.from_codes(np.zeros(n, np.int8), categories=pd.Index([""], dtype=object)),
    }).iloc[order]


def _with_rows(frame: pd.DataFrame, more: pd.DataFrame) -> pd.DataFrame:
    """frame and more, in conn_id order, each column keeping frame's dtype (categoricals: the
    union of both sets of categories)."""
    out = {}
    for name in frame.columns:
        a = frame[name]
        b = more[name] if name in more.columns else pd.Series([None] * len(more), dtype=object)
        if isinstance(a.dtype, pd.CategoricalDtype):
            cats, theirs = a.cat.categories, b.cat.categories
            new = theirs[~theirs.isin(cats)]
            if len(new):
                cats = cats.append(new)
            bcodes = b.cat.codes.to_numpy()
            bcodes = np.r_[cats.get_indexer(theirs), -1][bcodes]  # (-1, no value, stays -1)
            codes = np.r_[a.cat.codes.to_numpy().astype(np.int64), bcodes]
            out[name] = pd.Categorical.from_codes(codes, categories=cats, ordered=a.cat.ordered)
        else:
            out[name] = pd.concat([a, b.astype(a.dtype)], ignore_index=True)
    joined = pd.DataFrame(out)
    order = np.argsort(joined["conn_id"].to_numpy(), kind="stable")
    return joined.iloc[order].reset_index(drop=True)


def _endings(col: Columns, events, seg, role: np.ndarray, closed: np.ndarray, gone: np.ndarray,
             end_ns: np.ndarray, lport: np.ndarray, rport: np.ndarray, mono_to_wall_ns: int,
             rst_reasons: list | None = None) -> dict:
    """How each connection ended (analysis/end_rules.py on what the events around its CLOSE
    say), its first EOF, and whether events are missing."""
    ids, st, en, old, new = seg.ids, seg.starts, seg.ends, seg.old, seg.new
    n = len(ids)
    before = np.where(closed & ~gone, old[en], 0)
    rr = np.isin(ids, events(EventKind.RECV_RESET)[1])
    rs_rows, rs_gen = events(EventKind.SEND_RESET)
    rst_sent = np.isin(ids, rs_gen)
    rst_reason = np.full(n, -1, dtype=np.int32)
    pos, v = _per_conn(ids, rs_gen, col.at("value", rs_rows, ascending=True), last=True)
    rst_reason[pos] = v
    reasons, rst_reason = _one_numbering(rst_reasons, ids, rst_reason)
    errno = _errnos(col, events, ids, closed & ~gone, end_ns, lport, rport)
    rule, detail, details, errno = end_rules.classify_columns(end_rules.Ends(
        role == _ROLE["listener"], ~closed, before, rr, errno, rst_sent, rst_reason), reasons)
    reason = np.array([_END[r] for r in end_rules.REASON_OF_RULE], dtype=np.int8)[rule]
    eof_rows, eof_gen = events(EventKind.EOF, EventKind.IO_OWNER, flag=dec.F_EOF)
    eof_ns = np.full(n, NAT, dtype=np.int64)
    pos, v = _per_conn(ids, eof_gen, col.at("ts_ns", eof_rows, ascending=True).view(np.int64))
    eof_ns[pos] = v + mono_to_wall_ns
    # missed events: a transition whose old state is not where the previous one led
    gap = np.r_[False, new[:-1] != old[1:]] if len(old) else np.zeros(0, bool)
    gap[st] = False
    return {"end_reason": pd.Categorical.from_codes(reason, END_CATEGORIES),
            "end_detail": pd.Categorical.from_codes(detail, categories=pd.Index(details, dtype=object)),
            "rst_sent_reason": _named(np.where(rst_sent, rst_reason, -1), reasons.name),
            "errno": _named(errno, lambda v: errno_mod.errorcode.get(v, str(v))),
            "time_wait": reason == _END["active_close"], "eof_seen": wall_times(eof_ns),
            "incomplete": (np.logical_or.reduceat(gap, st) | gone) if n else np.zeros(0, bool)}


def _one_numbering(tables: list | None, ids: np.ndarray, reason: np.ndarray):
    """(one ResetReasons, the reasons in its numbering): files made on kernels that number
    enum sk_rst_reason differently are named each by its own table (a name the first table
    lacks gets a number past every table's)."""
    if not tables:
        return end_rules.kernel_reset_reasons(), reason
    first = tables[0]
    if len(tables) == 1 or all(t.names == first.names for t in tables[1:]):
        return first, reason
    names = dict(first.names)
    number = {n: v for v, n in names.items()}
    out = reason.copy()
    file = (ids.astype(np.uint64) >> np.uint64(48)).astype(np.int64)
    for f in range(1, len(tables)):
        for v in np.unique(reason[(file == f) & (reason >= 0)]):
            name = tables[f].names.get(int(v))
            if name is None:
                continue
            if name not in number:
                number[name] = max([*names, *tables[f].names, 0]) + 1 + len(names)
                names[number[name]] = name
            out[(file == f) & (reason == v)] = number[name]
    return end_rules.ResetReasons(names, "recording"), out


def _errnos(col: Columns, events, ids, closed, end_ns, lport, rport) -> np.ndarray:
    """The last errno reported on each connection (-1: none). A report without a connection
    id (the kernel could not tell the socket: connection map full) belongs, as in the live
    Tracker, to the connection that closed last with those ports within the hold time."""
    n = len(ids)
    kind = col["kind"]
    er_rows = np.flatnonzero(kind == EventKind.ERROR)
    g_rows, g_ids = events(EventKind.ERROR)
    pos = np.minimum(np.searchsorted(ids, g_ids), max(n - 1, 0))
    known = (ids[pos] == g_ids) if n else np.zeros(len(g_ids), bool)
    rows, conn = [g_rows[known]], [pos[known]]
    loose = np.setdiff1d(er_rows, g_rows, assume_unique=True)
    if len(loose) and closed.any():
        at = col.gather(loose, ascending=True)
        errs = pd.DataFrame({"t": at("ts_ns").view(np.int64), "k": at("sport").astype(np.int64) * 65536 + at("dport"),
                             "row": loose}).sort_values("t", kind="stable")
        shut = np.flatnonzero(closed)
        conns = pd.DataFrame({"t": end_ns[shut], "k": lport[shut].astype(np.int64) * 65536 + rport[shut],
                              "pos": shut}).sort_values("t", kind="stable")
        m = pd.merge_asof(errs, conns, on="t", by="k", tolerance=DEFAULT_HOLD_NS - 1).dropna(subset=["pos"])
        rows.append(m.row.to_numpy(dtype=np.int64))
        conn.append(m.pos.to_numpy(dtype=np.int64))
    rows, conn = np.concatenate(rows), np.concatenate(conn)
    order = np.argsort(rows, kind="stable")                # recorded order: the last one wins
    rows, conn = rows[order], conn[order]
    errno = np.full(n, -1, dtype=np.int32)
    errno[conn] = col.at("value", rows, ascending=True)    # (numpy: the last write wins)
    return errno


def _last_values(col: Columns, last_r: np.ndarray) -> dict:
    """Frame columns read from each connection's last transition (table rows last_r)."""
    at = col.gather(last_r)
    af, flags = at("family"), col["flags"][last_r]
    counted = (flags & dec.F_BYTES) != 0
    netns = at("netns").astype(np.int64)
    return {"family": _families(at, af), "laddr": addresses(at, "saddr", af), "raddr": addresses(at, "daddr", af),
            "netns": _masked(netns, (flags & dec.F_NETNS) != 0, "UInt32"), "netns_raw": netns,
            "uid": _masked(at("uid"), (flags & dec.F_UID) != 0, "UInt32"),
            "tx_b": _masked(at("tx_b"), counted, "UInt64"), "rx_b": _masked(at("rx_b"), counted, "UInt64")}


def _paths(old: np.ndarray, new: np.ndarray, st: np.ndarray, en: np.ndarray) -> pd.Categorical:
    """'CLOSE SYN_SENT ESTABLISHED ...' per connection, as a categorical. A path of up to 16
    states is packed 4 bits a state into one 64-bit key (one pass per position over the
    connections, not over the rows); each distinct key is spelled out once. Longer paths
    (rare) are spelled out one by one."""
    n = len(st)
    if not n:
        return pd.Categorical([])
    length = en - st + 1                      # transitions; the path has one state more
    short = length <= 15
    key = np.zeros(n, dtype=np.uint64)
    every = int(length.min())                 # positions every connection has: no mask
    for k in range(int(length[short].max()) + 1 if short.any() else 0):
        has = None if k <= every else np.flatnonzero(short & (length >= k))
        states = old[st] if k == 0 else new[st + k - 1] if has is None else new[st[has] + k - 1]
        sym = np.minimum(states, 14).astype(np.uint64)
        sym += np.uint64(1)                   # 0 = no state
        sym <<= np.uint64(4 * k)
        if has is None:
            key |= sym
        else:
            key[has] |= sym

    def spell(c: int) -> str:
        return " ".join(state_name(int(s)) for s in [old[st[c]], *new[st[c]:en[c] + 1]])
    long = np.flatnonzero(~short)
    key[long] = 0                             # (no short path has key 0)
    codes, uniq = factorize(key)
    names = [spell(c) for c in first_rows(codes, len(uniq))]
    if len(long):                             # each long path: a category of its own name
        codes = codes.copy()
        for c in long:
            codes[c] = len(names)
            names.append(spell(c))
    return spelled(codes, names)


def _named(values: np.ndarray, name) -> pd.Categorical:
    """Small integer codes (-1 = none, most rows) -> a categorical of their names."""
    some = np.flatnonzero(values >= 0)
    present = np.unique(values[some])
    codes = np.full(len(values), -1, dtype=np.int16 if len(present) < 2**15 else np.int64)
    codes[some] = np.searchsorted(present, values[some])
    return pd.Categorical.from_codes(codes, categories=[name(int(v)) for v in present])
