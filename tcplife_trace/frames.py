"""pandas DataFrames from recorded events, computed column-wise (no Python loop per event)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .probes import decode as dec
from .probes.event_layout import EventKind
from .probes.tcp_states import TcpState

STATE_CATEGORIES = [s.name for s in TcpState]  # kernel order, 1..12


class Columns:
    """Contiguous numpy copies of a recording's columns, made once and shared by the frames
    (a recording is many small batches: joining them is most of the memory traffic)."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._cache.get(name)
        if v is None:
            col = self.table[name]
            if pa.types.is_fixed_size_binary(col.type):
                v = _fixed_bytes(col)
            elif col.num_chunks == 1 and col.null_count == 0:
                v = col.chunk(0).to_numpy(zero_copy_only=False)  # a read-only view, no copy
            else:
                v = col.to_numpy()
            self._cache[name] = v
        return v


def _states(col: np.ndarray) -> pd.Categorical:
    codes = col.astype(np.int16) - 1
    codes[(codes < 0) | (codes >= len(STATE_CATEGORIES))] = -1  # unknown numbers -> NaN
    return pd.Categorical.from_codes(codes, categories=STATE_CATEGORIES)


def _fixed_bytes(col) -> np.ndarray:
    """A fixed-size binary column as an (n, width) uint8 array, without copying per value."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
    return data[arr.offset * width:(arr.offset + len(arr)) * width].reshape(-1, width)


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


def _decoded(col, decode) -> pd.Categorical:
    """Distinct values decoded once, then spread back by code."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    names = [decode(v) for v in enc.dictionary.to_pylist()]
    return spelled(enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), names)


def addresses(raw: np.ndarray, af: np.ndarray) -> pd.Categorical:
    """(n, 16) address bytes -> a categorical of printable addresses, each distinct one
    formatted once. IPv4-only data (the usual case) factorizes one 32-bit integer per row."""
    n = len(af)
    is4 = af == dec.AF_INET
    raw = np.ascontiguousarray(raw)
    v4 = raw[:, :4].copy().view(np.uint32).ravel() if n else np.zeros(0, np.uint32)
    if is4.all():
        codes, _ = pd.factorize(v4)
    else:
        halves = raw.view(np.uint64).reshape(n, 2)
        hi, _ = pd.factorize(np.where(is4, 0, halves[:, 0]))
        lo, uniq_lo = pd.factorize(np.where(is4, v4, halves[:, 1]))
        codes, _ = pd.factorize((hi.astype(np.int64) * max(len(uniq_lo), 1) + lo) * 2 + is4)
    first = first_rows(codes, int(codes.max()) + 1 if n else 0)
    return spelled(codes, _spell_addresses(raw[first], is4[first]))


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


def _families(daddr: np.ndarray, af: np.ndarray) -> pd.arrays.IntegerArray:
    """4 or 6 per row; v4-mapped IPv6 (a dual-stack socket's IPv4 peer) counts as 4."""
    is6 = af == dec.AF_INET6
    fam = np.full(len(af), 4, dtype=np.int8)
    if is6.any():  # ::ffff:a.b.c.d is 10 zero bytes, then 0xffff: three 32-bit words
        w = np.ascontiguousarray(daddr[is6]).view("<u4").reshape(-1, 4)
        mapped = (w[:, 0] == 0) & (w[:, 1] == 0) & (w[:, 2] == 0xFFFF0000)
        fam[is6] = np.where(mapped, 4, 6)
    return _masked(fam, (af == dec.AF_INET) | (af == dec.AF_INET6), "Int8")


def wall_times(ns: np.ndarray) -> pd.DatetimeIndex:
    """Nanoseconds since the epoch -> tz-aware UTC times, without per-value parsing."""
    return pd.DatetimeIndex(np.asarray(ns, dtype=np.int64).view("datetime64[ns]")).tz_localize("UTC")


def previous_in_connection(conn: np.ndarray) -> np.ndarray:
    """For each row, the index of the same connection's previous row (-1 for its first)."""
    order = np.argsort(conn, kind="stable")
    c = conn[order]
    prev_sorted = np.r_[-1, order[:-1]] if len(order) else order
    first = np.r_[True, c[1:] != c[:-1]] if len(c) else np.zeros(0, bool)
    prev_sorted = np.where(first, -1, prev_sorted)
    prev = np.empty_like(order)
    prev[order] = prev_sorted
    return prev


def _masked(values: np.ndarray, valid: np.ndarray, dtype: str):
    """A nullable pandas array: NA where not valid."""
    return pd.array(np.asarray(values), dtype=dtype) if valid.all() else \
        pd.arrays.IntegerArray(np.asarray(values).astype(pd.api.types.pandas_dtype(dtype).numpy_dtype),
                               ~np.asarray(valid, dtype=bool))


def dropped_by_filter(cols: Columns) -> np.ndarray:
    """Rows of connections that a kernel filter (-p/-L/-D/-4/-6) dropped part way: the live
    tracer forgets them, and so do the frames."""
    kind, gen = cols["kind"], cols["gen"]
    filtered = gen[(kind == EventKind.FILTERED) & (gen != 0)]
    if not len(filtered):
        return np.zeros(len(gen), dtype=bool)
    return np.isin(gen, filtered)


def transitions(table: pa.Table, mono_to_wall_ns: int, cols: Columns | None = None) -> pd.DataFrame:
    """One row per state change, in recorded order.

    ms_in_old is the time spent in `oldstate` (NaN when its start was not recorded, or
    when events in between are missing); cur_pid/cur_comm is the task the kernel was
    running, which in softirq transitions is not the connection's owner.
    """
    cols = cols or Columns(table)
    keep = (cols["kind"] == EventKind.STATE) & ~dropped_by_filter(cols)

    def col(name):  # one column of the state rows, without filtering the whole table
        return cols[name][keep]
    ts = col("ts_ns").astype(np.int64)
    gen = col("gen")
    old, new = col("oldstate"), col("newstate")
    af = col("family")
    flags = col("flags")
    sport, dport = col("sport"), col("dport")
    daddr = col("daddr")
    frame = pd.DataFrame({
        "conn_id": pd.array(gen, dtype="UInt64"),
        "time": wall_times(ts + mono_to_wall_ns),
        "ts_ns": ts,
        "oldstate": _states(old),
        "newstate": _states(new),
    })
    # time in the old state: since this connection's previous transition, if it led here
    prev = previous_in_connection(gen)
    has = prev >= 0
    ok = has & (new[np.where(has, prev, 0)] == old) & (gen != 0)
    frame["ms_in_old"] = np.where(ok, (ts - ts[np.where(has, prev, 0)]) / 1e6, np.nan)
    frame["cur_pid"] = pd.array(col("pid"), dtype="UInt32")
    frame["cur_comm"] = _decoded(table["comm"].filter(pa.array(keep)), dec.comm)
    frame["family"] = _families(daddr, af)
    frame["laddr"] = addresses(col("saddr"), af)
    frame["lport"] = _masked(sport, sport != 0, "UInt16")
    frame["raddr"] = addresses(daddr, af)
    frame["rport"] = _masked(dport, dport != 0, "UInt16")
    frame["netns"] = _masked(col("netns"), (flags & dec.F_NETNS) != 0, "UInt32")
    return frame
