"""pandas DataFrames from recorded events, computed column-wise (no Python loop per event)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tcplife_trace.probes import decode as dec
from tcplife_trace.probes.tcp_states import TcpState

STATE_CATEGORIES = [s.name for s in TcpState]  # kernel order, 1..12


class Columns:
    """A recording's columns as numpy, read in place from its (memory-mapped) batches.

    `cols[name]` is the whole column as one array: joined once, only for the columns used
    whole (a view when there is one batch). `cols.at(name, rows)` gathers values at some
    rows straight from the batches, for columns wanted at few rows (addresses, comm, ...):
    fresh memory is what costs most when frames are built from a large recording.
    """

    def __init__(self, table: pa.Table):
        self.table = table
        self._cache: dict[str, np.ndarray] = {}
        self._by_connection = None

    def _views(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Zero-copy numpy views of each batch of a column, and the batches' first rows."""
        chunks = [c for c in self.table[name].chunks if len(c)] or [self.table[name].combine_chunks()]
        views = [_fixed_bytes(c) if pa.types.is_fixed_size_binary(c.type)
                 else c.to_numpy(zero_copy_only=c.null_count == 0) for c in chunks]
        return views, np.cumsum([0] + [len(v) for v in views])

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._cache.get(name)
        if v is None:
            views, _ = self._views(name)
            v = views[0] if len(views) == 1 else np.concatenate(views)
            self._cache[name] = v
        return v

    def at(self, name: str, rows: np.ndarray, ascending: bool = False) -> np.ndarray:
        """The column's values at `rows` (ascending: rows are known to be sorted)."""
        return self.gather(rows, ascending)(name)

    def gather(self, rows: np.ndarray, ascending: bool = False):
        """A function name -> that column's values at `rows`; the rows are grouped by batch
        once for all the columns it is asked for (rows not ascending are sorted once, the
        values put back in their order)."""
        bounds = np.cumsum([0] + [len(c) for c in self.table.column(0).chunks])
        multi = len(bounds) > 2
        perm = None
        if multi and not ascending:
            perm = np.argsort(rows, kind="stable")
            rows = rows[perm]
        cuts = np.searchsorted(rows, bounds) if multi else None

        def values(name: str, part: tuple[int, int] | None = None) -> np.ndarray:
            """part=(start, width): of a fixed-size binary column only those bytes, as one
            unsigned integer per row (width 4 or 8), without reading the rest."""
            v = self._cache.get(name)
            views = [v] if v is not None else self._views(name)[0]
            if part is not None:
                views = [w[:, part[0]:part[0] + part[1]] for w in views]
            if len(views) == 1:
                out = views[0][rows]
            else:
                out = np.empty((len(rows),) + views[0].shape[1:], dtype=views[0].dtype)
                for b, view in enumerate(views):
                    if cuts[b] < cuts[b + 1]:
                        out[cuts[b]:cuts[b + 1]] = view[rows[cuts[b]:cuts[b + 1]] - bounds[b]]
            if part is not None:
                out = out.view(f"<u{part[1]}").reshape(-1)
            if perm is None:
                return out
            back = np.empty_like(out)
            back[perm] = out
            return back
        return values

    def by_connection(self):
        """The state changes sorted by connection (frames/by_connection.py), made once."""
        if self._by_connection is None:
            from .by_connection import ByConnection
            self._by_connection = ByConnection(self)
        return self._by_connection


def _states(col: np.ndarray) -> pd.Categorical:
    codes = col.astype(np.int16) - 1
    codes[(codes < 0) | (codes >= len(STATE_CATEGORIES))] = -1  # unknown numbers -> NaN
    return pd.Categorical.from_codes(codes, categories=STATE_CATEGORIES)


def _fixed_bytes(arr: pa.Array) -> np.ndarray:
    """A fixed-size binary array as an (n, width) uint8 view of its buffer."""
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8) if len(arr) else np.zeros(0, np.uint8)
    return data[arr.offset * width:(arr.offset + len(arr)) * width].reshape(-1, width)


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values) in order of first appearance, as pd.factorize; with Arrow's
    hash kernel, 3-4x faster on integer columns of millions of rows."""
    if not len(values):
        return np.zeros(0, np.int32), values[:0]
    enc = pc.dictionary_encode(pa.array(np.ascontiguousarray(values)))
    return enc.indices.to_numpy(zero_copy_only=False), enc.dictionary.to_numpy(zero_copy_only=False)


def first_rows(codes: np.ndarray, ncat: int) -> np.ndarray:
    """The first row holding each code 0..ncat-1."""
    first = np.zeros(ncat, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # the last write wins
    return first


def spelled(codes: np.ndarray, names: list[str]) -> pd.Categorical:
    """Row codes and one name per code -> a categorical; codes whose names coincide
    (two raw values that print the same) are merged."""
    if len(set(names)) != len(names):
        uniq, remap = np.unique(np.array(names, dtype=object), return_inverse=True)
        names, codes = list(uniq), remap[codes]
    return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype=object))


def decoded(at, name: str, decode) -> pd.Categorical:
    """A 16-byte column (comm) at some rows -> a categorical; each distinct value decoded once.
    at: Columns.gather(rows). Distinct values are found on its two 64-bit words."""
    words = [at(name, (0, 8)), at(name, (8, 8))]
    codes, uniq = factorize(words[0])
    c, u = factorize(words[1])
    codes, uniq = factorize(codes.astype(np.int64) * max(len(u), 1) + c)
    first = first_rows(codes, len(uniq))
    raw = np.stack([w[first] for w in words], axis=1).view(np.uint8).reshape(len(first), 16)
    return spelled(codes, [decode(r.tobytes()) for r in raw])


def addresses(at, name: str, af: np.ndarray) -> pd.Categorical:
    """An address column at some rows (at: Columns.gather(rows)) -> a categorical of printable
    addresses, each distinct one formatted once. IPv4-only rows (the usual case) read and
    factorize one 32-bit word per row; with IPv6 rows all 16 bytes are read."""
    n = len(af)
    is4 = af == dec.AF_INET
    if is4.all():
        v4 = at(name, (0, 4))
        codes, _ = factorize(v4)
        first = first_rows(codes, int(codes.max()) + 1 if n else 0)
        raw = np.zeros((len(first), 16), np.uint8)
        raw[:, :4] = v4[first].view(np.uint8).reshape(-1, 4)
    else:
        raw = at(name)
        halves = np.ascontiguousarray(raw).view(np.uint64).reshape(n, 2)
        v4 = np.ascontiguousarray(raw[:, :4]).view(np.uint32).ravel()
        hi, _ = factorize(np.where(is4, 0, halves[:, 0]))
        lo, uniq_lo = factorize(np.where(is4, v4, halves[:, 1]))
        codes, _ = factorize((hi.astype(np.int64) * max(len(uniq_lo), 1) + lo) * 2 + is4)
        first = first_rows(codes, int(codes.max()) + 1 if n else 0)
        raw = raw[first]
    return spelled(codes, _spell_addresses(raw, is4[first]))


def _spell_addresses(raw: np.ndarray, is4: np.ndarray) -> list[str]:
    """Distinct addresses as text: IPv4 dotted quads joined in Arrow (no Python per address),
    IPv6 (rarer) through decode.addr."""
    names = np.empty(len(raw), dtype=object)
    if is4.any():
        quads = raw[is4, :4]
        parts = [pa.array(quads[:, k]).cast(pa.string()) for k in range(4)]
        names[is4] = pc.binary_join_element_wise(*parts, ".").to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~is4):
        names[i] = dec.addr(dec.AF_INET6, raw[i].tobytes())
    return list(names)


def _families(at, af: np.ndarray) -> pd.arrays.IntegerArray:
    """4 or 6 per row; v4-mapped IPv6 (a dual-stack socket's IPv4 peer) counts as 4.
    at: Columns.gather(rows), for the peer addresses of IPv6 rows."""
    is6 = af == dec.AF_INET6
    fam = np.full(len(af), 4, dtype=np.int8)
    if is6.any():  # ::ffff:a.b.c.d is 10 zero bytes, then 0xffff: three 32-bit words
        w = np.ascontiguousarray(at("daddr")[is6]).view("<u4").reshape(-1, 4)
        mapped = (w[:, 0] == 0) & (w[:, 1] == 0) & (w[:, 2] == 0xFFFF0000)
        fam[is6] = np.where(mapped, 4, 6)
    return _masked(fam, (af == dec.AF_INET) | (af == dec.AF_INET6), "Int8")


def wall_times(ns: np.ndarray) -> pd.DatetimeIndex:
    """Nanoseconds since the epoch -> tz-aware UTC times, without per-value parsing."""
    return pd.DatetimeIndex(np.asarray(ns, dtype=np.int64).view("datetime64[ns]"), tz="UTC")


def _masked(values: np.ndarray, valid: np.ndarray, dtype: str):
    """A nullable pandas array: NA where not valid."""
    values = np.asarray(values).astype(pd.api.types.pandas_dtype(dtype).numpy_dtype, copy=False)
    return pd.arrays.IntegerArray(values, ~np.asarray(valid, dtype=bool))


def transitions(table: pa.Table, mono_to_wall_ns: int, cols: Columns | None = None,
                cgroup_paths: dict | None = None) -> pd.DataFrame:
    """One row per state change, in recorded order.

    ms_in_old is the time spent in `oldstate` (NaN when its start was not recorded, or
    when events in between are missing); cur_pid/cur_comm is the task the kernel was
    running, which in softirq transitions is not the connection's owner. cgroup_id is the
    connection's owner's cgroup after the change (the kernel's fold: NA before an owner, and
    in recordings before schema 4); cgroup and container_id what its path showed
    (cgroup_paths: id -> path as recorded; NA for an id it does not name).
    """
    cols = cols or Columns(table)
    by = cols.by_connection()
    rows = by.frame_rows

    col = cols.gather(rows, ascending=True)  # columns of the state rows, read from the batches
    ts = by.ts_frame
    af = col("family")
    flags = col("flags")
    sport, dport = col("sport"), col("dport")
    frame = pd.DataFrame(copy=False, data={
        "conn_id": pd.array(by.ids_of(rows, col("gen")), dtype="UInt64"),  # (map full: by_connection)
        "time": wall_times(ts + mono_to_wall_ns),
        "ts_ns": ts.copy(),  # (ts is the shared by-connection cache)
        "oldstate": _states(col("oldstate")),
        "newstate": _states(col("newstate")),
    })
    # time in the old state: since this connection's previous transition, if it led here
    pos, ns = by.time_in_old()
    ms = np.full(len(rows), np.nan)
    ms[by.order[pos]] = ns / 1e6
    frame["ms_in_old"] = ms
    frame["cur_pid"] = pd.array(col("pid"), dtype="UInt32")
    frame["cur_comm"] = decoded(col, "comm", dec.comm)
    frame["family"] = _families(col, af)
    frame["laddr"] = addresses(col, "saddr", af)
    frame["lport"] = _masked(sport, sport != 0, "UInt16")
    frame["raddr"] = addresses(col, "daddr", af)
    frame["rport"] = _masked(dport, dport != 0, "UInt16")
    frame["netns"] = _masked(col("netns"), (flags & dec.F_NETNS) != 0, "UInt32")
    cg = col("cgroup_id")
    frame["cgroup_id"] = _masked(cg, cg != 0, "UInt64")
    frame["cgroup"], frame["container_id"] = _homes(cg, cgroup_paths or {})
    return frame


def _homes(cg: np.ndarray, paths: dict) -> tuple[pd.Series, pd.Series]:
    """(cgroup path, container id) per row of cgroup ids, each distinct id classified once."""
    from ..containers import classify
    ids, inv = np.unique(cg, return_inverse=True)
    path = np.empty(len(ids), dtype=object)
    container = np.empty(len(ids), dtype=object)
    for i, c in enumerate(ids.tolist()):
        p = paths.get(c) if c else None
        path[i] = p
        container[i] = None if p is None else classify(p).container_id
    inv = inv.ravel()
    return pd.Series(path[inv], dtype=object), pd.Series(container[inv], dtype=object)
