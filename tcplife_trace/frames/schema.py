"""The declared schema of every frame `analyze` gives (and `--export` writes as Parquet).

One dtype per key column whichever frame holds it, so frames join on their keys
(snapshots to lifecycles on netns/laddr/lport/raddr/rport, findings to either on
netns/owner_pid, ...); and every frame has its full schema even with no rows, so two
exports always have the same Parquet schema and concatenate. In pandas the text keys
are categorical; in Parquet they are plain strings (any reader joins on them: a
dictionary column does not join in Arrow and needs a shared cache in polars), and
the closed vocabularies (states, roles, end reasons, ...) are dictionary<int32,
string> whatever their number of values.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa

from tcplife_trace.analysis.leaks import SEVERITIES
from tcplife_trace.analysis.rules import END_REASONS, OWNER_SOURCES, ROLES
from .columns import STATE_CATEGORIES


class Vocab:
    """A categorical over a fixed vocabulary (in Parquet: dictionary-encoded)."""

    def __init__(self, categories, ordered: bool = False):
        self.categories, self.ordered = list(categories), ordered


OPEN = "category"   # a categorical over the values present (in Parquet: dictionary-encoded)
TEXT_KEY = "key"    # a text key: categorical in pandas, plain string in Parquet
TEXT = "object"     # free text, None when absent
LIST = "list"       # a list of strings
JSON = "json"       # a dict; JSON text in Parquet
STATES = Vocab(STATE_CATEGORIES)
UTC = "datetime64[ns, UTC]"

# the key columns, one dtype each in every frame that has them
KEYS = {
    "host": TEXT_KEY, "conn_id": "UInt64", "netns": "UInt32",
    "laddr": TEXT_KEY, "lport": "UInt16", "raddr": TEXT_KEY, "rport": "UInt16",
    "pid": "UInt32", "listener_pid": "UInt32", "cur_pid": "UInt32", "owner_pid": "UInt32",
    "comm": TEXT_KEY, "cur_comm": TEXT_KEY, "owner_comm": TEXT_KEY,
    "state": STATES, "oldstate": STATES, "newstate": STATES,
}


def _cols(*names_and_types) -> list[tuple[str, object]]:
    """Columns in order; a bare name is a key column (its type from KEYS)."""
    return [(c, KEYS[c]) if isinstance(c, str) else c for c in names_and_types]


# a connection's health (probes/health.py COLUMNS), in the snapshots and lifecycles frames
_HEALTH_COLS = [("rtt_ms", "float64"), ("rttvar_ms", "float64"), ("min_rtt_ms", "float64"),
                ("total_retrans", "Int64"), ("bytes_retrans", "Int64"), ("segs_in", "Int64"),
                ("segs_out", "Int64"), ("data_segs_in", "Int64"), ("data_segs_out", "Int64"),
                ("lost", "Int64"), ("reordering", "Int64"), ("delivered", "Int64"),
                ("delivery_rate", "Int64"), ("snd_cwnd", "Int64"), ("rcv_rtt_ms", "float64")]

FRAMES: dict[str, list[tuple[str, object]]] = {
    "transitions": _cols("conn_id", ("time", UTC), ("ts_ns", "int64"), "oldstate", "newstate",
                         ("ms_in_old", "float64"), "cur_pid", "cur_comm", ("family", "Int8"),
                         "laddr", "lport", "raddr", "rport", "netns",
                         # the connection's home after the change (schema 4 recordings)
                         ("cgroup_id", "UInt64"), ("cgroup", TEXT), ("container_id", TEXT)),
    "lifecycles": _cols("conn_id", ("role", Vocab(ROLES)), ("family", "Int8"), "laddr", "lport", "raddr",
                        "rport", "netns", ("birth_seen", "bool"), ("start", UTC), ("end", UTC),
                        ("duration_s", "float64"), "listener_pid", "pid", "comm",
                        ("owner_source", Vocab(OWNER_SOURCES)), ("uid", "UInt32"),
                        ("end_reason", Vocab([*END_REASONS, "open"])), ("end_detail", OPEN), ("rst_sent_reason", OPEN),
                        ("errno", OPEN), ("time_wait", "bool"), ("tx_b", "UInt64"), ("rx_b", "UInt64"),
                        ("eof_seen", UTC), ("incomplete", "bool"), ("path", OPEN),
                        # what the kernel's fold adds (issue 15): NA in recordings made before it
                        ("handshake_ms", "float64"), ("retransmits", "Int64"), ("syn_retransmits", "Int64"),
                        ("recoveries", "Int64"), ("losses", "Int64"), *_HEALTH_COLS,
                        ("cgroup_id", "UInt64"), ("cgroup", TEXT), ("runtime", TEXT), ("container_id", TEXT),
                        ("pod_uid", TEXT), ("pod_name", TEXT), ("pod_namespace", TEXT)),
    "state_durations": _cols("conn_id", "state", ("seconds", "float64")),
    "summary": _cols("state", ("count", "int64"), ("p50_s", "float64"), ("p90_s", "float64"),
                     ("p99_s", "float64"), ("max_s", "float64")),
    "leaks": _cols(("kind", TEXT), ("severity", Vocab(SEVERITIES, ordered=True)), ("count", "Int64"),
                   ("summary", TEXT), ("advice", TEXT), "netns", "owner_pid", "owner_comm", ("local", TEXT),
                   ("peer", TEXT), ("rate_per_s", "float64"), ("oldest_age_s", "float64"),
                   ("age_lower_bound", "bool"), ("samples", LIST), ("evidence", JSON)),
    "snapshots": _cols(("time", UTC), ("complete", "bool"), "netns", "state", "laddr", "lport", "raddr",
                       "rport", ("inode", "Int64"), ("timer", TEXT), ("rqueue", "Int64"), ("wqueue", "Int64"),
                       ("idle_recv_s", "float64"), ("idle_sent_s", "float64"), "owner_pid", "owner_comm",
                       ("owner_fd", "Int64"), ("age_s", "float64"), ("age_lower_bound", "bool"),
                       ("eof_age_s", "float64"), ("age_source", TEXT),
                       # tcp_info (probes/health.py) and the socket's cgroup (containers.py)
                       ("rtt_ms", "float64"), ("rttvar_ms", "float64"), ("min_rtt_ms", "float64"),
                       ("total_retrans", "Int64"), ("bytes_retrans", "Int64"), ("segs_in", "Int64"),
                       ("segs_out", "Int64"), ("data_segs_in", "Int64"), ("data_segs_out", "Int64"),
                       ("lost", "Int64"), ("reordering", "Int64"), ("delivered", "Int64"),
                       ("delivery_rate", "Int64"), ("snd_cwnd", "Int64"), ("rcv_rtt_ms", "float64"),
                       ("cgroup_id", "UInt64"), ("cgroup", TEXT), ("container_id", TEXT), ("pod_uid", TEXT)),
}


def columns(name: str, host: bool = False) -> list[tuple[str, object]]:
    """The declared (column, type) list of a frame; fleet frames start with `host`."""
    return ([("host", KEYS["host"])] if host else []) + FRAMES[name]


def conform(name: str, df: pd.DataFrame, host: bool = False) -> pd.DataFrame:
    """The frame with its declared columns in order and their declared dtypes (a column of
    the right dtype is kept as it is, not copied; a declared column the frame lacks, as from
    an older recording, is all missing values); columns the declaration does not know follow
    as they are (tests/test_offline_frames.py checks there are none)."""
    if name == "summary" and df.index.name == "state":
        df = df.reset_index()
    decl = columns(name, host)
    known = {c for c, _ in decl}
    absent = pd.Series([None] * len(df), index=df.index, dtype=object)
    out = {c: _typed(df[c] if c in df.columns else absent, t) for c, t in decl}
    out.update({c: df[c] for c in df.columns if c not in known})
    if list(out) == list(df.columns) and all(out[c] is df[c] for c in out):
        return df
    return pd.DataFrame(out, index=df.index, copy=False)


def _typed(s: pd.Series, t) -> pd.Series:
    if isinstance(t, Vocab):
        want = pd.CategoricalDtype(t.categories, ordered=t.ordered)
        if isinstance(s.dtype, pd.CategoricalDtype) and list(s.cat.categories) == t.categories \
                and s.cat.ordered == t.ordered:
            return s
        values = s.astype(object).where(s.notna(), None)
        extra = sorted({str(v) for v in values.dropna()} - set(t.categories))  # (say, a state 13): kept
        if extra:
            want = pd.CategoricalDtype(t.categories + extra, ordered=t.ordered)
        return values.astype(want)
    if t in (OPEN, TEXT_KEY):
        if isinstance(s.dtype, pd.CategoricalDtype):
            return s
        values = s.astype(object).where(s.notna(), None)
        cats = pd.Index(sorted({str(v) for v in values.dropna()}), dtype=object)
        return pd.Series(pd.Categorical(values, categories=cats), index=s.index)
    if t in (TEXT, LIST, JSON):
        if isinstance(s.dtype, np.dtype) and s.dtype == object:  # (pandas' "str" equals object too)
            return s
        return s.astype(object).where(s.notna(), None)
    if t == "bool":
        if s.dtype == bool:
            return s
        return s.astype("boolean").fillna(False).astype(bool)
    if t == UTC:
        if str(s.dtype) == UTC:
            return s
        return pd.to_datetime(s, utc=True).astype(UTC)
    if str(s.dtype) == t:
        return s
    return s.astype(t)


_ARROW = {"UInt64": pa.uint64(), "UInt32": pa.uint32(), "UInt16": pa.uint16(), "Int8": pa.int8(),
          "Int64": pa.int64(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
          UTC: pa.timestamp("ns", tz="UTC"), TEXT: pa.string(), TEXT_KEY: pa.string(), JSON: pa.string(),
          LIST: pa.list_(pa.string()), OPEN: pa.dictionary(pa.int32(), pa.string())}


def arrow_type(t) -> pa.DataType:
    if isinstance(t, Vocab):
        return pa.dictionary(pa.int32(), pa.string(), ordered=t.ordered)
    return _ARROW[t]


def arrow_schema(name: str, host: bool = False) -> pa.Schema:
    """The Parquet schema of an exported frame (without the pandas metadata)."""
    return pa.schema([pa.field(c, arrow_type(t)) for c, t in columns(name, host)])


def to_arrow(name: str, df: pd.DataFrame, host: bool = False) -> pa.Table:
    """The frame as an Arrow table of its declared schema (pandas' metadata kept, so that
    pandas reads the nullable integers back as such)."""
    df = conform(name, df, host)
    for c, t in columns(name, host):
        if t == JSON:  # free-form: as JSON text, so every row fits one schema
            df = df.assign(**{c: df[c].map(lambda v: None if v is None else json.dumps(v, sort_keys=True,
                                                                                       default=str))})
    table = pa.Table.from_pandas(df, preserve_index=False)
    declared = arrow_schema(name, host)
    fields = [declared.field(f.name) if f.name in declared.names else _plain(f) for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _plain(field: pa.Field) -> pa.Field:
    """An undeclared column, typed by the rules of the declared ones as far as they go: text
    as strings (all missing included), categoricals dictionary-encoded."""
    if pa.types.is_dictionary(field.type):
        return field.with_type(_ARROW[OPEN])
    if field.type in (pa.large_string(), pa.null()):
        return field.with_type(pa.string())
    return field


def empty(name: str, host: bool = False) -> pd.DataFrame:
    """A frame of no rows with its full schema."""
    return conform(name, pd.DataFrame({c: pd.Series([], dtype=object) for c, _ in columns(name, host)}), host)

