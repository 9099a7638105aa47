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


def _decoded(col, decode) -> pd.Categorical:
    """Distinct values decoded once, then spread back by code."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    names = [decode(v) for v in enc.dictionary.to_pylist()]
    idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(set(names)) != len(names):  # two raw values that print the same: merge them
        uniq, remap = np.unique(np.array(names, dtype=object), return_inverse=True)
        names, idx = list(uniq), remap[idx]
    return pd.Categorical.from_codes(idx, categories=pd.Index(names, dtype=object))


def _addresses(table: pa.Table, column: str, af: np.ndarray) -> pd.Categorical:
    """16-byte addresses -> strings (IPv4 in the first 4 bytes when af is AF_INET)."""
    col = table[column].combine_chunks()
    is4 = af == dec.AF_INET
    # tag each value with its family so one dictionary decodes both kinds
    raw = _fixed_bytes(col)
    tagged = np.concatenate([raw, is4[:, None].astype(np.uint8)], axis=1) if len(af) else \
        np.zeros((0, 17), np.uint8)
    tagged_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(17), len(af),
                                                      [None, pa.py_buffer(tagged.tobytes())])
    return _decoded(tagged_col, lambda v: dec.addr(dec.AF_INET if v[16] else dec.AF_INET6, v[:16]))


def _family(table: pa.Table, af: np.ndarray) -> pd.arrays.IntegerArray:
    daddr = _fixed_bytes(table["daddr"])
    mapped = (daddr[:, :10] == 0).all(axis=1) & (daddr[:, 10] == 0xFF) & (daddr[:, 11] == 0xFF)
    fam = np.where(af == dec.AF_INET, 4, np.where(mapped, 4, 6))
    return _masked(fam, (af == dec.AF_INET) | (af == dec.AF_INET6), "Int8")


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


def transitions(table: pa.Table, mono_to_wall_ns: int) -> pd.DataFrame:
    """One row per state change, in recorded order.

    ms_in_old is the time spent in `oldstate` (NaN when its start was not recorded, or
    when events in between are missing); cur_pid/cur_comm is the task the kernel was
    running, which in softirq transitions is not the connection's owner.
    """
    kind = table["kind"].to_numpy()
    t = table.filter(pa.array(kind == EventKind.STATE))
    ts = t["ts_ns"].to_numpy().astype(np.int64)
    gen = t["gen"].to_numpy()
    old, new = t["oldstate"].to_numpy(), t["newstate"].to_numpy()
    af = t["family"].to_numpy()
    flags = t["flags"].to_numpy()
    sport, dport = t["sport"].to_numpy(), t["dport"].to_numpy()
    frame = pd.DataFrame({
        "conn_id": pd.array(gen, dtype="UInt64"),
        "time": pd.to_datetime(ts + mono_to_wall_ns, unit="ns", utc=True),
        "ts_ns": ts,
        "oldstate": _states(old),
        "newstate": _states(new),
    })
    # time in the old state: since this connection's previous transition, if it led here
    prev = previous_in_connection(gen)
    has = prev >= 0
    ok = has & (new[np.where(has, prev, 0)] == old) & (gen != 0)
    frame["ms_in_old"] = np.where(ok, (ts - ts[np.where(has, prev, 0)]) / 1e6, np.nan)
    frame["cur_pid"] = pd.array(t["pid"].to_numpy(), dtype="UInt32")
    frame["cur_comm"] = _decoded(t["comm"], dec.comm)
    frame["family"] = _family(t, af)
    frame["laddr"] = _addresses(t, "saddr", af)
    frame["lport"] = _masked(sport, sport != 0, "UInt16")
    frame["raddr"] = _addresses(t, "daddr", af)
    frame["rport"] = _masked(dport, dport != 0, "UInt16")
    frame["netns"] = _masked(t["netns"].to_numpy(), (flags & dec.F_NETNS) != 0, "UInt32")
    return frame
