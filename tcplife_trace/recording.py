"""Recordings: every event that reached user space, in an Arrow IPC stream.

The stream format survives a crash: it is a sequence of record batches, each
complete on its own. The schema (with the header) is on the disk from the file's
creation, and every event is flushed and fsynced within half a second of reaching
the writer, by a thread of the writer's own, so a file cut by SIGKILL or power loss
still loads up to its last flushed batch. A clean stop
appends one empty batch whose metadata holds the exit summary. Files are created
mode 0600 (they hold addresses and process names) and never overwritten.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from . import __version__
from tcplife_trace.probes.decode import events_array
from tcplife_trace.probes.btf import TCP_SOCK_HEALTH
from tcplife_trace.probes.event_layout import ARROW_TYPES, EVENT_DTYPE, EVENT_SIZE, LIFE_DTYPE, SRC_NONE, V1_FIELD_NAMES, V3_FIELD_NAMES

SCHEMA_VERSION = 4  # 2: the kernel's fold appended to each event (dur_ns, owner_*, role, xflags)
# 3: what only the fold knows of each ended connection (its LIFE record: the owner's cgroup,
#    retransmits as they happened, health at the end) in batches of their own (LIVES_KEY)
# 4: each event's cgroup_id (the fold's owner's after it), and the paths of the cgroup ids
#    the events name, as they were when recorded (CGROUPS_KEY)
KEY = b"tcplife_trace"          # schema metadata: the recording's header (JSON)
END_KEY = "tcplife_trace.end"   # metadata of the closing batch: the exit summary (JSON)
# metadata of an empty batch: one sock_diag snapshot, its sockets as the detectors read them
# (an Arrow IPC stream, zstd) and its time, namespaces' counters and sysctls (JSON)
SNAP_KEY = "tcplife_trace.snapshot"
SNAP_META_KEY = "tcplife_trace.snapshot_meta"
# metadata of an empty batch: the fold's extras of connections that ended (LIVES_TYPES rows, an
# Arrow IPC stream, zstd), written with the events flushed at the same time
LIVES_KEY = "tcplife_trace.lives"
# metadata of an events batch: {cgroup id: its path, None if gone} of the ids its events name
# that no batch before named (JSON), resolved when they were written
CGROUPS_KEY = "tcplife_trace.cgroups"
# an event given to the writer is on the disk (fsynced) within FLUSH_SECONDS; the flusher
# thread looks every FLUSH_TICK, and writes early once FLUSH_EVENTS are pending
FLUSH_SECONDS = 0.5
FLUSH_TICK = 0.05
FLUSH_EVENTS = 65536
# the events the flusher may fall behind by before the consumer writes them itself: a bound on
# the memory the recording holds (the ring buffer then fills instead, and what it cannot hold
# is counted as lost, never kept in memory without end)
MAX_PENDING_EVENTS = 4 * FLUSH_EVENTS

# Arrow columns: struct tlt_event's fields (probes/event_layout.py ARROW_TYPES, declared once
# there); addresses and comm stay raw fixed-size binary. Schema 1 had the first 21 (up to seq),
# schemas 2 and 3 all but cgroup_id: such files load with the columns added since as zeros
# (xflags 0: no fold of the kernel's; cgroup_id 0: NA).
_ARROW_TYPES = ARROW_TYPES
_V1_TYPES = {n: _ARROW_TYPES[n] for n in V1_FIELD_NAMES}
_V3_TYPES = {n: _ARROW_TYPES[n] for n in V3_FIELD_NAMES}
assert all(EVENT_DTYPE[n].itemsize == (t.byte_width if pa.types.is_fixed_size_binary(t) else t.bit_width // 8)
           for n, t in _ARROW_TYPES.items())  # each column's bytes are its Arrow values


# one row per LIFE record (analysis/lifecycle.py FOLD_EXTRAS, raw as the kernel gave them):
# conn_id is its generation; cgroup the cgroup's path, resolved when it was recorded (None: gone)
# (each fold column's type that of its struct tlt_agg field in probes/event_layout.py)
_HEALTH_NAMES = [f"h_{n}" for n in TCP_SOCK_HEALTH]
_AGG_TYPE = {n: pa.from_numpy_dtype(LIFE_DTYPE["agg"][n].base) for n in LIFE_DTYPE["agg"].names}
LIVES_TYPES = {"conn_id": ARROW_TYPES["gen"], "owner_src": _AGG_TYPE["owner_src"], "cgroup_id": _AGG_TYPE["cgroup_id"],
               "cgroup": pa.string(),
               **{n: _AGG_TYPE[n] for n in ("lflags", "retrans", "syn_retrans", "recoveries", "losses", "health_mask")},
               **{n: _AGG_TYPE["health"] for n in _HEALTH_NAMES}}
LIVES_SCHEMA = pa.schema([pa.field(n, t) for n, t in LIVES_TYPES.items()])


def lives_table(lives: np.ndarray, resolve=None) -> pa.Table:
    """LIFE records (LIFE_DTYPE) as LIVES_TYPES rows; resolve: cgroup id -> path (None: not
    resolved)."""
    agg = lives["agg"]
    cols = {"conn_id": lives["ev"]["gen"], "owner_src": agg["owner_src"], "cgroup_id": agg["cgroup_id"]}
    ids = agg["cgroup_id"]
    paths = [None] * len(lives)
    if resolve is not None:
        known = {int(i): resolve(int(i)) for i in np.unique(ids) if i}
        paths = [known.get(int(i)) for i in ids.tolist()]
    arrays = [pa.array(np.ascontiguousarray(v), type=LIVES_TYPES[k]) for k, v in cols.items()]
    arrays.append(pa.array(paths, type=pa.string()))
    for k in ("lflags", "retrans", "syn_retrans", "recoveries", "losses", "health_mask"):
        arrays.append(pa.array(np.ascontiguousarray(agg[k]), type=LIVES_TYPES[k]))
    health = agg["health"]
    arrays += [pa.array(np.ascontiguousarray(health[:, i]), type=LIVES_TYPES[n]) for i, n in enumerate(_HEALTH_NAMES)]
    return pa.Table.from_arrays(arrays, schema=LIVES_SCHEMA)


def _lives_blob(tables: list) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, LIVES_SCHEMA, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        for t in tables:
            w.write_table(t)
    return sink.getvalue().to_pybytes()


def _zero_column(typ, n: int) -> pa.Array:
    width = typ.byte_width if pa.types.is_fixed_size_binary(typ) else typ.bit_width // 8
    return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(bytes(width * n))])


def _upgraded(table: pa.Table) -> pa.Table:
    """A table of schema 1 to 3 with the columns added since (zeros; owner_src SRC_NONE, no owner
    known, as the kernel sends it without a fold), in today's order."""
    n = table.num_rows
    for name, typ in _ARROW_TYPES.items():
        if name not in table.column_names:
            col = _zero_column(typ, n)
            if name == "owner_src":
                col = pa.Array.from_buffers(typ, n, [None, pa.py_buffer(np.full(n, SRC_NONE, EVENT_DTYPE[name]))])
            table = table.append_column(pa.field(name, typ), pa.chunked_array([col], typ))
    return table


class RecordingError(Exception):
    """A recording that cannot be read or written; the message names the file."""


def _schema(header: dict) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in _ARROW_TYPES.items()],
                     metadata={KEY: json.dumps(header).encode()})


def _batch(schema: pa.Schema, blob: bytes) -> pa.RecordBatch:
    """Packed struct tlt_event records -> one Arrow batch, each column's bytes handed to Arrow
    as they are (pa.array() would import pandas, a second's stall of a live trace)."""
    arr = np.frombuffer(blob, dtype=EVENT_DTYPE)
    n = len(arr)
    cols = [pa.Array.from_buffers(typ, n, [None, pa.py_buffer(np.ascontiguousarray(arr[name]))])
            for name, typ in _ARROW_TYPES.items()]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _packed(events: list) -> bytes:
    """`Ev`-ordered tuples back into struct tlt_event records (no fold: xflags 0 and
    owner_src SRC_NONE, as the kernel sends an event without one)."""
    return events_array(events).tobytes()


def _table(events: list, head: dict) -> pa.Table:
    return pa.Table.from_batches([_batch(_schema(head), _packed(events))])


def header(filters, wall_offset_ns: int, extra: dict | None = None, host: str | None = None) -> dict:
    """A recording's header; host: the name analyze and fleet analysis know it by (--host;
    this machine's hostname by default). filters: the session's probes.filters.Filters, kept
    as text (`filters`, for people) and as `filter_spec` (what analyze applies again); a
    string is the text alone, as recordings made before `filter_spec` have it."""
    spec = None
    if not isinstance(filters, str):
        spec = {"pids": list(filters.pids), "lports": list(filters.lports), "rports": list(filters.rports),
                "family": filters.family}
        if filters.cgroups:  # (analyze applies them again by the recorded cgroup paths)
            spec["cgroups"] = [{"path": t.path, "id": t.id, "level": t.level, "label": t.label}
                               for t in filters.cgroups]
        filters = filters.describe()
    return {
        "schema_version": SCHEMA_VERSION, "tool": "tcplife-trace", "tool_version": __version__,
        "host": host or socket.gethostname(), "kernel": os.uname().release,
        "start_wall": time.time(), "mono_to_wall_ns": wall_offset_ns, "filters": filters,
        **({"filter_spec": spec} if spec is not None else {}),
        "event_size": EVENT_SIZE, **_rst_reasons(), **(extra or {}),
    }


def _rst_reasons() -> dict:
    """This kernel's enum sk_rst_reason from BTF, so that offline frames name the recorded
    reset reasons as the kernel that sent them numbers them (analysis/end_rules.py)."""
    from tcplife_trace.analysis.end_rules import kernel_reset_reasons
    table = kernel_reset_reasons()
    return {"rst_reasons": table.header_value()} if table.source == "btf" else {}


_SPEC_LIMITS = {"pids": (1, 2**22), "lports": (1, 65535), "rports": (1, 65535)}
_TEXT_PARTS = {"pid": "pids", "lport": "lports", "rport": "rports"}


def recorded_filters(head: dict, where: str):
    """The -p/-L/-D/-4/-6 and cgroup filters a recording was made with (probes.filters.Filters), from its
    header: `filter_spec`, or in recordings made before it the text of Filters.describe()
    ("pid 1234; lport 80; IPv4", "none"). Imported tcpstates text has none. RecordingError
    naming `where` when neither can be read."""
    from tcplife_trace.probes.filters import Filters
    if head.get("imported_from"):
        return Filters()
    spec, text = head.get("filter_spec"), head.get("filters")
    fix = ("analyse everything it holds with --all-recorded (and give the filters it was made "
           "with again, -p/-L/-D/-4/-6)")
    if spec is not None:
        f = _filters_from_spec(spec)
        if f is None:
            raise RecordingError(f"{where}: the filters it was recorded with cannot be read (filter_spec "
                                 f"{json.dumps(spec)[:80]}): {fix}")
        return f
    if text is None:
        return Filters()
    f = _filters_from_text(text)
    if f is None:
        raise RecordingError(f"{where}: the filters it was recorded with cannot be read ({text[:80]!r}, not "
                             f"what tcplife-trace writes): {fix}")
    return f


def _sockets_kept(sockets, filters):
    """A recorded snapshot's sockets that the recording's filters keep, as the live look kept
    them (evidence.sockets_matching, then diagnosis.in_cgroups by the recorded cgroup paths)."""
    from tcplife_trace.analysis import evidence
    kept = evidence.sockets_matching(sockets, filters)
    if filters is not None and filters.cgroups and "cgroup_id" in kept.columns and len(kept):
        from .diagnosis import in_cgroups
        kept = kept[in_cgroups(kept, filters.cgroup_match_recorded)]
    return kept


def _filters_from_spec(spec):
    from tcplife_trace.probes.filters import CgroupTarget, Filters
    if not isinstance(spec, dict) or not set(spec) <= {*_SPEC_LIMITS, "family", "cgroups"}:
        return None
    targets = []
    for t in spec.get("cgroups", []) if isinstance(spec.get("cgroups", []), list) else [None]:
        if not (isinstance(t, dict) and set(t) == {"path", "id", "level", "label"}
                and isinstance(t["path"], str) and t["path"].startswith("/") and isinstance(t["label"], str)
                and all(type(t[k]) is int and t[k] >= 0 for k in ("id", "level"))):
            return None
        targets.append(CgroupTarget(t["path"], t["id"], t["level"], t["label"]))
    values = {}
    for name, (lo, hi) in _SPEC_LIMITS.items():
        v = spec.get(name, [])
        if not isinstance(v, list) or not all(type(x) is int and lo <= x <= hi for x in v):
            return None
        values[name] = tuple(v)
    family = spec.get("family")
    if family not in (None, 4, 6) or type(family) is bool:
        return None
    return Filters(family=family, cgroups=tuple(targets), **values)


def _filters_from_text(text: str):
    """Filters.describe()'s text back into Filters; None when it is not such a text."""
    from tcplife_trace.probes.filters import Filters
    if text == "none":
        return Filters()
    values: dict = {}
    for part in text.split("; "):
        name, _, rest = part.partition(" ")
        if part in ("IPv4", "IPv6") and "family" not in values:
            values["family"] = int(part[-1])
            continue
        key = _TEXT_PARTS.get(name)
        if key is None or key in values or not rest:
            return None
        lo, hi = _SPEC_LIMITS[key]
        nums = rest.split(",")
        if not all(n.isascii() and n.isdigit() and lo <= int(n) <= hi for n in nums):
            return None
        values[key] = tuple(int(n) for n in nums)
    f = Filters(**values)
    return f if f.describe() == text else None  # (its own order and spelling only)


class RecordingWriter:
    """Writes events as they come; a thread of its own flushes and fsyncs them, so that what
    is on the disk trails the consumer by at most FLUSH_SECONDS whatever the caller is busy
    with (a look at every socket, the detectors' start-up)."""

    def __init__(self, path: str, head: dict):
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise RecordingError(f"{path}: already exists; recordings are never overwritten, "
                                 "choose another name") from None
        except OSError as e:
            raise RecordingError(f"{path}: cannot create ({e.strerror})") from None
        self._file = os.fdopen(fd, "wb")
        self._schema = _schema(head)
        self._writer = ipc.new_stream(self._file, self._schema)
        self._lock = threading.Lock()   # the pending events (the consumer appends, the flusher takes)
        self._io = threading.RLock()    # the file
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_lives: list[np.ndarray] = []  # LIFE records, written with the events
        self.lives = 0              # LIFE records given to it
        self._resolver = None       # cgroup id -> path (containers.Resolver), made at first use
        self._cgroups_named: set[int] = set()  # cgroup ids whose path a batch's CGROUPS_KEY holds
        self._oldest = 0.0              # when the oldest pending event was given (monotonic)
        self.events = 0             # events given to it
        self.written = 0            # events in the file, fsynced
        self._unsynced = 0
        self.snapshots = 0
        self.closed = False
        self.failed: str | None = None  # why writing stopped (disk full, ...): one line, the file named
        # the schema (and so the header) on the disk at once: a file cut before its first events
        # still opens as a recording, with nothing in it, instead of as 0 bytes
        if not (self._writing(lambda: self._writer.write_batch(_batch(self._schema, b""))) and self._sync()):
            why = self.failed
            _unlink_quietly(path)
            raise RecordingError(why)
        self._wake = threading.Event()
        self._stopping = False
        self._flusher = threading.Thread(target=self._flush_loop, name="tcplife-recording", daemon=True)
        self._flusher.start()

    def add(self, events: list) -> None:
        """Events as `Ev`-ordered tuples; on the disk within FLUSH_SECONDS (the flusher thread)."""
        if self.failed or not events:
            return
        self._add_blob(_packed(events), len(events))

    def add_batch(self, events: np.ndarray) -> None:
        """Events as a probes.event_layout.EVENT_DTYPE array (a stream Batch's `events`):
        their bytes are the records as they are, no per-event packing."""
        if self.failed or not len(events):
            return
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"add_batch takes EVENT_DTYPE records, not {events.dtype}")
        # kept as it is until written (the caller's own array, never changed after: a Batch's)
        self._add_blob(np.ascontiguousarray(events), len(events))

    def add_lives(self, lives: np.ndarray) -> None:
        """LIFE records (LIFE_DTYPE: a stream Batch's `lives`): what only the kernel's fold knows
        of each connection that ended (cgroup, retransmits, health), written with the events
        pending at the same time (on the disk within FLUSH_SECONDS too)."""
        if self.failed or not len(lives):
            return
        if lives.dtype != LIFE_DTYPE:
            raise TypeError(f"add_lives takes LIFE_DTYPE records, not {lives.dtype}")
        with self._lock:
            if not self._pending and not self._pending_lives:
                self._oldest = time.monotonic()
            self._pending_lives.append(lives)
            self.lives += len(lives)

    def _add_blob(self, blob, n: int) -> None:
        with self._lock:
            if not self._pending and not self._pending_lives:
                self._oldest = time.monotonic()
            self._pending.append(blob)
            self._pending_bytes += n * EVENT_SIZE
            self.events += n
            pending = self._pending_bytes
        if pending >= MAX_PENDING_EVENTS * EVENT_SIZE:
            self.flush()  # the flusher is behind: written here, at the consumer's cost
        elif pending >= FLUSH_EVENTS * EVENT_SIZE:
            self._wake.set()

    def _flush_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_TICK)
            self._wake.clear()
            with self._lock:
                due = (self._pending or self._pending_lives) and (time.monotonic() - self._oldest >= FLUSH_SECONDS - FLUSH_TICK
                                         or self._pending_bytes >= FLUSH_EVENTS * EVENT_SIZE)
            if due and not self._stopping:
                try:
                    self.flush()
                except Exception as e:  # noqa: BLE001 - not an OS error (those set failed already)
                    # a dead flusher would leave nothing fsynced until close, and say nothing
                    self.failed = (f"{self.path}: recording stopped: {type(e).__name__}: {e}; the file "
                                   f"keeps the {self.written} events written before")
                    return

    def add_snapshot(self, taken_ns: int, complete: bool, sockets, extra: dict | None = None) -> None:
        """A sock_diag snapshot: its sockets frame (analysis.evidence.SOCKET_COLUMNS), when it was
        taken (CLOCK_MONOTONIC ns), whether it holds every state; extra: per-namespace counters,
        sysctls, names. Written and fsynced at once, after the events before it."""
        if self.closed or self.failed:
            return
        table = pa.Table.from_pandas(sockets, preserve_index=False)
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_table(table)
        meta = json.dumps({"taken_ns": int(taken_ns), "complete": bool(complete), **(extra or {})}, default=str)
        blob = sink.getvalue().to_pybytes()
        with self._io:
            if self.closed or self.failed or not self._write_pending():
                return
            if self._writing(lambda: self._writer.write_batch(_batch(self._schema, b""), custom_metadata={
                    SNAP_KEY: blob, SNAP_META_KEY: meta})):
                self.snapshots += 1
                self._sync()

    def flush(self) -> None:
        """Write and fsync every pending event now."""
        with self._io:
            if not self.closed and not self.failed and self._write_pending():
                self._sync()

    def _write_pending(self) -> bool:
        with self._lock:
            blobs, self._pending, self._pending_bytes = self._pending, [], 0
            lives, self._pending_lives = self._pending_lives, []
        if blobs:
            blob = b"".join(blobs)  # (bytes and EVENT_DTYPE arrays alike)
            meta = self._new_cgroups(blob)
            if not self._writing(lambda: self._writer.write_batch(_batch(self._schema, blob), custom_metadata=meta)):
                return False
            self._unsynced += len(blob) // EVENT_SIZE
        if lives:  # after the events written with them: a LIFE record follows its CLOSE
            meta = {LIVES_KEY: _lives_blob([lives_table(x, self._cgroup_path) for x in lives])}
            if not self._writing(lambda: self._writer.write_batch(_batch(self._schema, b""), custom_metadata=meta)):
                return False
        return True

    def _new_cgroups(self, blob: bytes) -> dict | None:
        """CGROUPS_KEY metadata for the cgroup ids these events name that no batch before did
        (one lookup per distinct id); None when there are none."""
        ids = np.unique(np.frombuffer(blob, dtype=EVENT_DTYPE)["cgroup_id"]).tolist()
        new = [i for i in ids if i and i not in self._cgroups_named]
        if not new:
            return None
        self._cgroups_named.update(new)
        return {CGROUPS_KEY: json.dumps({str(i): self._cgroup_path(i) for i in new})}

    def _cgroup_path(self, cgroup_id: int) -> str | None:
        """The cgroup's path now (it may be gone by the time the recording is read)."""
        if self._resolver is None:
            from .containers import Resolver
            self._resolver = Resolver()
        return self._resolver.path_of(cgroup_id)

    def _sync(self) -> bool:
        if self._writing(lambda: (self._file.flush(), os.fsync(self._file.fileno()))):
            self.written += self._unsynced  # on the disk now
            self._unsynced = 0
            return True
        return False

    def _writing(self, write) -> bool:
        """Run a write; on an OS error (disk full, I/O error) stop recording for good, keeping
        the file as it is (every batch written before loads), and say why in `failed`."""
        try:
            write()
            return True
        except OSError as e:
            n = self.written
            self.failed = (f"{self.path}: recording stopped: {e.strerror or e}; the file keeps the "
                           f"{n} event{'' if n == 1 else 's'} written before (analyze reads it as cut off)")
            self.closed = True
            try:
                self._file.close()
            except OSError:
                pass
            return False

    def _stop_flusher(self) -> None:
        flusher = getattr(self, "_flusher", None)
        if flusher is not None and flusher is not threading.current_thread():
            self._stopping = True
            self._wake.set()
            flusher.join()

    def close(self, summary: dict | None = None) -> None:
        self._stop_flusher()
        with self._io:
            if self.closed:
                return
            self.flush()
            if self.failed:
                return
            end = {"stop_wall": time.time(), "events": self.written, "snapshots": self.snapshots, **(summary or {})}
            empty = _batch(self._schema, b"")
            if self._writing(lambda: (self._writer.write_batch(empty, custom_metadata={END_KEY: json.dumps(end)}),
                                      self._writer.close(), self._file.flush(), os.fsync(self._file.fileno()),
                                      self._file.close())):
                self.closed = True

    def discard(self) -> None:
        """Close and remove the file: nothing was traced (the start was refused)."""
        self._stop_flusher()
        with self._io:
            if not self.closed:
                self.closed = True
                try:
                    self._file.close()
                except OSError:
                    pass
        _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_header(path: str, text_import=None) -> dict:
    """Only the header of a recording; for tcpstates text, what its import will say (the host
    is text_import.host, None when not given: unknown). RecordingError (one line naming the
    file and the problem) when it is neither."""
    from . import tcpstates_import
    f, size = _open(path)
    with f:
        if tcpstates_import.looks_like_tcpstates(path):
            return {"imported_from": "tcpstates text", "source": path,
                    "host": getattr(text_import, "host", None)}
        return _checked_stream(f, path, size)[1]


# what the frames compute with: a mangled value must stop at the door, not deep in a frame
_CLOCK_LIMIT = 1 << 62  # ns: about 146 years either way


def _header_problem(head) -> str | None:
    """Why a recording's header (already JSON, with a schema_version) cannot be used; None if it can."""
    if not isinstance(head, dict):
        return f"a JSON {type(head).__name__}, not an object"
    mono = head.get("mono_to_wall_ns", 0)
    if type(mono) is not int or not -_CLOCK_LIMIT < mono < _CLOCK_LIMIT:
        return f"mono_to_wall_ns is {str(mono)[:40]!r}, not a clock offset in ns"
    start = head.get("start_wall", 0.0)
    if type(start) not in (int, float) or not math.isfinite(start):
        return f"start_wall is {str(start)[:40]!r}, not a time"
    for name in ("host", "kernel", "filters", "tool_version"):
        if name in head and head[name] is not None and not isinstance(head[name], str):
            return f"{name} is not a string"
    return None


def _checked_stream(f, path: str, size: int):
    """(Arrow stream reader, header) of an open recording; RecordingError if it is not one we read."""
    if size == 0:
        raise RecordingError(f"{path}: empty file, not a tcplife-trace recording")
    try:
        reader = ipc.open_stream(f)
    except (pa.ArrowException, OSError) as e:
        raise RecordingError(f"{path}: not a tcplife-trace recording (not an Arrow stream: "
                             f"{str(e).splitlines()[0][:80]})") from None
    meta = reader.schema.metadata or {}
    if KEY not in meta:
        raise RecordingError(f"{path}: an Arrow stream, but not a tcplife-trace recording")
    try:
        head = json.loads(meta[KEY])
        version = int(head["schema_version"])
    except (ValueError, KeyError, TypeError):
        raise RecordingError(f"{path}: corrupt recording header") from None
    problem = _header_problem(head)
    if problem:
        raise RecordingError(f"{path}: corrupt recording header ({problem})")
    if version > SCHEMA_VERSION:
        raise RecordingError(f"{path}: written by a newer tcplife-trace (schema {version}, this "
                             f"one reads up to {SCHEMA_VERSION}): upgrade tcplife-trace")
    try:
        columns = [(fl.name, fl.type) for fl in reader.schema]
    except UnicodeDecodeError:
        columns = None
    older = {1: _V1_TYPES, 2: _V3_TYPES, 3: _V3_TYPES}.get(max(version, 1))  # (what that schema had)
    if columns != list(_ARROW_TYPES.items()) and (older is None or columns != list(older.items())):
        raise RecordingError(f"{path}: corrupt recording (unexpected columns)")
    return reader, head


def _open(path: str):
    """(file, size), or RecordingError naming the file."""
    try:
        return open(path, "rb"), os.path.getsize(path)
    except OSError as e:
        raise RecordingError(f"{path}: cannot open ({e.strerror})") from None


def _mapped(f, path: str, size: int):
    """The open file memory-mapped (the file itself when it cannot be: a pipe, an empty file)."""
    if size == 0 or not os.path.isfile(path):
        return f
    try:
        return pa.memory_map(path)
    except (OSError, pa.ArrowException):
        return f


def check(path: str) -> None:
    """Raise RecordingError (one line naming the file) unless path opens as a recording we can read."""
    from . import tcpstates_import
    f, size = _open(path)
    with f:
        if not tcpstates_import.looks_like_tcpstates(path):
            _checked_stream(f, path, size)


def read(path: str) -> tuple[dict, pa.Table, dict | None, list[str], list, pa.Table, dict]:
    """(header, events table, exit summary or None, warnings, snapshots as (meta, sockets frame),
    the connections' fold extras as LIVES_TYPES rows, {cgroup id: path or None} of the ids the
    events name, as recorded).
    Raises RecordingError."""
    f, size = _open(path)
    with f:
        # memory-mapped: batches are read in place from the page cache, and only the columns
        # a frame uses are ever touched (a 10M-event recording is 1.3 GB)
        src = _mapped(f, path, size)
        reader, head = _checked_stream(src, path, size)
        batches, end, warnings, snaps, lives, cgroups = [], None, [], [], [], {}
        while True:
            try:
                batch, custom = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                break
            except (pa.ArrowException, OSError, struct.error):
                warnings.append(f"{path}: recording ends early (cut off while being written?); "
                                f"loaded the {sum(len(b) for b in batches)} events of its complete batches")
                break
            if custom and SNAP_KEY.encode() in custom:
                try:
                    snaps.append(_snapshot(custom))
                except (pa.ArrowException, OSError, ValueError, KeyError, TypeError, AttributeError, MemoryError):
                    warnings.append(f"{path}: an unreadable socket snapshot (skipped)")
            if custom and LIVES_KEY.encode() in custom:
                try:
                    t = ipc.open_stream(pa.py_buffer(custom[LIVES_KEY.encode()])).read_all()
                    t.validate(full=True)
                    if t.schema.remove_metadata() != LIVES_SCHEMA:
                        raise ValueError("other columns")
                    lives.append(t)
                except (pa.ArrowException, OSError, ValueError):
                    warnings.append(f"{path}: an unreadable batch of connection folds (skipped: those "
                                    "connections' health, retransmits and cgroup are NA)")
            if custom and CGROUPS_KEY.encode() in custom:
                named = _cgroup_paths(custom[CGROUPS_KEY.encode()])
                if named is None:
                    warnings.append(f"{path}: an unreadable table of cgroup paths (skipped: those cgroups' "
                                    "paths and containers are NA in the transitions frame)")
                else:
                    cgroups.update(named)
            if custom and END_KEY.encode() in custom:
                try:
                    end = json.loads(custom[END_KEY.encode()])
                except ValueError:
                    warnings.append(f"{path}: unreadable exit summary")
            if len(batch):
                try:
                    batch.validate()  # buffer sizes against the length: nothing read out of bounds
                except pa.ArrowException:
                    warnings.append(f"{path}: a corrupt batch of events (skipped)")
                    continue
                batches.append(batch)
        if end is None and not warnings:
            warnings.append(f"{path}: recording was not closed cleanly (no exit summary); "
                            "loaded every complete batch")
    table = pa.Table.from_batches(batches, schema=reader.schema)
    if table.num_columns < len(_ARROW_TYPES):
        table = _upgraded(table)
    return head, table, end, warnings, snaps, _one_lives(lives), cgroups


def _cgroup_paths(blob: bytes) -> dict[int, str | None] | None:
    """A CGROUPS_KEY value as {id: path or None}; None when it is not one."""
    try:
        named = json.loads(blob)
    except ValueError:
        return None
    if not isinstance(named, dict) or not all(
            k.isascii() and k.isdigit() and 0 < int(k) < 1 << 64 and (v is None or isinstance(v, str))
            for k, v in named.items()):
        return None
    return {int(k): v for k, v in named.items()}


def _one_lives(tables: list) -> pa.Table:
    """The LIVES_TYPES rows of a file (none before schema 3), one per connection id (the last)."""
    if not tables:
        return LIVES_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _snapshot(custom) -> tuple:
    """(meta, sockets frame) of a snapshot batch's metadata; namespace keys back to integers."""
    import pandas as pd

    from tcplife_trace.analysis import evidence
    meta = json.loads(custom[SNAP_META_KEY.encode()])
    if not isinstance(meta, dict) or not isinstance(meta.get("taken_ns"), int):
        raise ValueError("snapshot without a time")
    for k in ("mibs", "sysctls", "netns_names", "sockstat"):
        meta[k] = {int(ns): v for ns, v in (meta.get(k) or {}).items()}
    table = ipc.open_stream(pa.py_buffer(custom[SNAP_KEY.encode()])).read_all()
    # every offset and length checked before pandas reads a byte: a flipped byte in a string
    # column's offsets made to_pandas read outside the buffers (a segfault)
    table.validate(full=True)
    from tcplife_trace.probes.socket_snapshot import EXTRA_COLUMNS
    if table.column_names not in (list(evidence.SOCKET_COLUMNS), list(evidence.SOCKET_COLUMNS_V1),
                                  [*evidence.SOCKET_COLUMNS, *EXTRA_COLUMNS]):
        raise ValueError("snapshot with other columns")
    df = table.to_pandas()
    frame = evidence.sockets_frame(df)
    if EXTRA_COLUMNS[0] in df:  # health and cgroup of each socket (recordings since issue 15)
        frame = pd.concat([frame, df[list(EXTRA_COLUMNS)].set_axis(frame.index)], axis=1)
    # values each column's type can hold (a flipped byte made a port 70000): TypeError otherwise
    from .frames.schema import conform
    conform("snapshots", frame.assign(time=pd.Timestamp(0, tz="UTC"), complete=False))
    return meta, frame


class Recording:
    """One or more loaded recordings: headers, exit summaries and events, and frames built
    from them. Several files are analysed as one: their clocks are aligned on the first
    file's wall clock and connection ids are made unique per file.

    Its frames hold what the live session showed: each file's connections that pass the
    filters it was recorded with (-p/-L/-D/-4/-6, per connection, by the live rule:
    frames/filters.py), whatever else reached the file. all_recorded=True: every
    connection the file holds."""

    def __init__(self, paths, text_import=None, all_recorded: bool = False):
        """text_import: a tcpstates_import.TextImport (day, host, time zone of text captures)."""
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not self.paths:
            raise RecordingError("no recording given")
        self.all_recorded = all_recorded
        self._combine([_read_any(str(p), text_import) for p in self.paths])

    @classmethod
    def from_events(cls, events: list, head: dict, end: dict | None = None,
                    all_recorded: bool = False) -> "Recording":
        """A recording of events held in memory (e.g. a live session's), analysed the same way."""
        rec = cls.__new__(cls)
        rec.paths = []
        rec.all_recorded = all_recorded
        rec._combine([(head, _table(events, head), end, [], [])])
        return rec

    def _combine(self, loaded: list) -> None:
        # each file's fold extras (LIVES_TYPES rows; none in a text import or an in-memory
        # recording), their connection ids tagged by file as the events' are below
        lives = [x[5] if len(x) > 5 else LIVES_SCHEMA.empty_table() for x in loaded]
        # the paths of the cgroup ids the events name, as recorded (schema 4), then those of
        # the LIFE records' (schema 3): the first file that names an id wins
        self.cgroup_paths: dict[int, str | None] = {}
        for x, t in zip(loaded, lives):
            named = dict(x[6]) if len(x) > 6 else {}
            if t.num_rows:
                for cg, path in zip(t["cgroup_id"].to_pylist(), t["cgroup"].to_pylist()):
                    if cg and named.get(cg) is None:
                        named[cg] = path
            for cg, path in named.items():
                if self.cgroup_paths.get(cg) is None:
                    self.cgroup_paths[cg] = path
        loaded = [tuple(x[:5]) for x in loaded]
        if len(lives) > 1:
            import pyarrow.compute as pc
            lives = [t if not i or not t.num_rows else t.set_column(0, "conn_id", pc.add(
                t["conn_id"], pa.scalar(i << 48, pa.uint64()))) for i, t in enumerate(lives)]
        self.lives = pa.concat_tables(lives) if len(lives) > 1 else lives[0]
        self.headers = [h for h, _, _, _, _ in loaded]
        self.ends = [e for _, _, e, _, _ in loaded]
        self.warnings = [w for _, _, _, ws, _ in loaded for w in ws]
        if len(loaded) > 1:
            self.warnings += _one_host_notes(self.paths or ["in memory"] * len(loaded), self.headers,
                                             [_span(h, t) for h, t, _, _, _ in loaded])
        # per file: the filters it was recorded with (None: unreadable, with all_recorded only)
        # and those its frames apply
        from tcplife_trace.probes.filters import Filters
        self.recorded_filters = []
        for i, h in enumerate(self.headers):
            try:
                self.recorded_filters.append(recorded_filters(h, self.paths[i] if self.paths else "in memory"))
            except RecordingError:
                if not self.all_recorded:
                    raise
                self.recorded_filters.append(None)
        self.applied_filters = [Filters() if self.all_recorded or f is None else f for f in self.recorded_filters]
        # (wall time ns, meta, sockets frame) of every snapshot, each on its own file's clock
        # (everything the file holds: the filters are applied by snapshots() and leaks())
        snaps = sorted(((m["taken_ns"] + int(h.get("mono_to_wall_ns", 0)), i, m, df)
                        for i, (h, (_, _, _, _, snaps)) in enumerate(zip(self.headers, loaded))
                        for m, df in snaps), key=lambda x: x[0])
        self.snapshot_list = [(t, m, df) for t, _, m, df in snaps]
        self._snapshot_files = [i for _, i, _, _ in snaps]
        self._file_rows = np.cumsum([0] + [t.num_rows for _, t, _, _, _ in loaded])
        base = int(self.headers[0].get("mono_to_wall_ns", 0))
        tables = []
        for i, (h, t, _, _, _) in enumerate(loaded):
            shift = int(h.get("mono_to_wall_ns", 0)) - base
            if i:  # (the first file is the reference: no shift, ids as recorded)
                import pyarrow.compute as pc
                gen = t["gen"]
                # connection ids: file index in the top 16 bits (0 stays "no generation")
                tagged = pc.if_else(pc.equal(gen, 0), gen, pc.add(gen, pa.scalar(i << 48, pa.uint64())))
                t = t.set_column(t.schema.get_field_index("gen"), "gen", tagged)
                if shift:
                    ts = pc.add(pc.cast(t["ts_ns"], pa.int64()), pa.scalar(shift, pa.int64()))
                    t = t.set_column(0, "ts_ns", pc.cast(ts, pa.uint64()))
            tables.append(t)
        # left in its batches (memory-mapped): frames.Columns joins only the columns it uses whole
        self.events = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        del tables, loaded
        self.header = self.headers[0]
        self.end = self.ends[0] if len(self.ends) == 1 else None
        self.path = self.paths[0] if self.paths else None

    @property
    def mono_to_wall_ns(self) -> int:
        return int(self.headers[0].get("mono_to_wall_ns", 0))

    def columns(self):
        from .frames.columns import Columns
        if not hasattr(self, "_columns"):
            self._columns = Columns(self.events)
        return self._columns

    @property
    def transitions(self):
        """One row per state change (see README, "Recordings")."""
        from .frames.columns import transitions
        if not hasattr(self, "_transitions"):
            self._transitions = self._kept_rows(transitions(self.events, self.mono_to_wall_ns, self.columns(),
                                                            cgroup_paths=self.cgroup_paths))
        return self._transitions

    def lifecycles(self):
        """One row per connection (see README, "Recordings")."""
        if not hasattr(self, "_lifecycles"):
            self._lifecycles = self._kept_rows(self._every_lifecycle())
        return self._lifecycles

    def _every_lifecycle(self):
        from .frames.schema import conform
        from .frames.lifecycles import lifecycles
        if not hasattr(self, "_all_lifecycles"):
            from tcplife_trace.analysis.end_rules import ResetReasons
            frame = conform("lifecycles", lifecycles(
                self.events, self.mono_to_wall_ns, self.columns(),
                rst_reasons=[ResetReasons.from_header(h) for h in self.headers], lives=self.lives))
            self._all_lifecycles = self._open_health(frame)
        return self._all_lifecycles

    def _open_health(self, frame):
        """The connections still open at the end with the health of each file's last snapshot
        (the live session's last look at exit), joined on views.OPEN_HEALTH_KEY."""
        from .frames.lifecycles import with_open_health
        last = {}
        for (_, _, df), i in zip(self.snapshot_list, self._snapshot_files, strict=True):
            last[i] = df  # (in time order: the last one stays)
        if not last:
            return frame
        file_of = frame["conn_id"].to_numpy(dtype=np.uint64, na_value=0) >> np.uint64(48)
        for i, df in last.items():
            frame = with_open_health(frame, df, file_of == i)
        return frame

    def _kept_ids(self):
        """The ids of the connections each file's applied filters keep; None when no file has any."""
        if not hasattr(self, "_kept"):
            self._kept = None
            if any(f.active() for f in self.applied_filters):
                from .frames.filters import files_of, kept
                lc = self._every_lifecycle()
                conn_file = files_of(lc, self.columns(), self._file_rows)
                keep = np.zeros(len(lc), dtype=bool)
                for i, f in enumerate(self.applied_filters):
                    mine = conn_file == i
                    keep |= kept(lc, self.columns(), f, mine) if f.active() else mine
                self._kept = lc["conn_id"][keep]
        return self._kept

    def _kept_rows(self, df):
        ids = self._kept_ids()
        return df if ids is None else df[df["conn_id"].isin(ids).to_numpy(dtype=bool)].reset_index(drop=True)

    def snapshot_filters(self):
        """The filters of the file the last snapshot came from (what the findings scope the
        sockets and counters with); None without snapshots."""
        return self.applied_filters[self._snapshot_files[-1]] if self._snapshot_files else None

    def state_durations(self):
        """Long form: connection x state -> seconds spent there."""
        from .frames.connections import recorded_state_durations
        if not hasattr(self, "_state_durations"):
            self._state_durations = self._kept_rows(recorded_state_durations(self.columns().by_connection()))
        return self._state_durations

    def summary(self):
        """Per state: count of connections that spent time there, p50/p90/p99/max seconds."""
        from .frames.connections import summary
        return summary(self.state_durations())

    def snapshots(self):
        """Every sock_diag snapshot recorded (`--record` with `--poll-interval`): one row per
        socket, `time` (UTC) and `complete` (every state, or the periodic subset) first, then
        the sockets the detectors read (see README, "Recordings")."""
        import pandas as pd
        from tcplife_trace.analysis import evidence
        parts = [_sockets_kept(df, self.applied_filters[i]).assign(
                     time=pd.Timestamp(t, unit="ns", tz="UTC"), complete=bool(m["complete"]))
                 for (t, m, df), i in zip(self.snapshot_list, self._snapshot_files, strict=True)]
        from .frames.schema import conform
        from tcplife_trace.probes.socket_snapshot import EXTRA_COLUMNS
        cols = ["time", "complete", *evidence.SOCKET_COLUMNS]
        if not parts:  # (typed all the same: an empty frame has the full schema)
            parts = [evidence.empty_sockets().assign(time=pd.Series([], dtype="datetime64[ns, UTC]"), complete=False)]
        parts = [p.reindex(columns=[*p.columns, *(c for c in EXTRA_COLUMNS if c not in p)]) for p in parts]
        cols += EXTRA_COLUMNS  # (NA in snapshots recorded before them)
        return conform("snapshots", pd.concat(parts, ignore_index=True)[cols])

    def leaks(self, thresholds=None, port_range=None):
        """Leak and pile findings from what the recording shows (see README, "Findings");
        one row per finding, most severe first."""
        from .frames.schema import conform
        from .frames.leaks import DEFAULT_PORT_RANGE, findings, stopped_at
        return conform("leaks", findings(self.lifecycles(), self.transitions, thresholds,
                                         port_range or DEFAULT_PORT_RANGE, stopped_at(self.ends), self.snapshot_list,
                                         filters=self.snapshot_filters()))

    def _group(self, keys: list[str]):
        from .frames.connections import grouped
        return grouped(self.lifecycles(), keys)

    def by_peer(self):
        return self._group(["raddr", "rport"])

    def by_local_port(self):
        return self._group(["lport"])

    def by_process(self):
        return self._group(["pid", "comm"])

    def __repr__(self) -> str:
        clean = sum(e is not None for e in self.ends)
        return (f"<Recording {', '.join(map(str, self.paths)) or 'in memory'}: {self.events.num_rows} events, "
                f"{clean}/{len(self.ends)} closed cleanly>")


def _read_any(path: str, text_import=None) -> tuple[dict, pa.Table, dict | None, list[str], list]:
    """A recording, or text captured with tcpstates -T -w (imported, with what it lacks said)."""
    from . import tcpstates_import
    if os.path.isfile(path) and tcpstates_import.looks_like_tcpstates(path):
        events, offset, warnings, assumed = tcpstates_import.parse(path, text_import)
        # what the capture does not say is given, assumed (and said) or unknown: never taken
        # from the machine that analyses it
        head = header("imported", offset, {"imported_from": "tcpstates text", "source": path, "kernel": None,
                                           "host": getattr(text_import, "host", None), "capture": assumed,
                                           "start_wall": events[0][0] / 1e9 if events else None})
        return head, _table(events, head), None, warnings, []
    return read(path)


def _span(head: dict, table: pa.Table):
    """(first, last) event of a file, wall-clock ns; None without events."""
    if not table.num_rows:
        return None
    import pyarrow.compute as pc
    mm = pc.min_max(table["ts_ns"])
    off = int(head.get("mono_to_wall_ns", 0))
    return int(mm["min"].as_py()) + off, int(mm["max"].as_py()) + off


def load(path_or_paths, text_import=None, all_recorded: bool = False) -> Recording:
    return Recording(path_or_paths, text_import, all_recorded)


def _one_host_notes(paths: list[str], headers: list[dict], spans: list) -> list[str]:
    """What loading several files as one timeline means, said: consecutive recordings of one
    host are one timeline (the gaps between them unrecorded); overlapping ones count the
    connections of the overlap once per file; files of several hosts are mixed."""
    def when(ns):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))
    hosts = sorted({h.get("host") or "unknown host" for h in headers})
    if len(hosts) > 1:
        return [f"recordings of {len(hosts)} hosts ({', '.join(hosts)}) analysed as one timeline; "
                "tcplife_trace.fleet.analyze (or tcplife-trace analyze) keeps each host apart"]
    timed = sorted(((sp, p, h) for p, h, sp in zip(paths, headers, spans, strict=True) if sp is not None),
                   key=lambda x: x[0])
    out = [f"{hosts[0]}: {len(paths)} recordings of this host analysed as one timeline, in time order: "
           + ", ".join(f"{p} ({when(a)} to {when(b)})" for (a, b), p, _ in timed)
           + "".join(f", {p} (no events)" for p, sp in zip(paths, spans) if sp is None)]
    gaps = []
    for ((_, a1), pa_, ha), ((b0, b1), pb, hb) in zip(timed, timed[1:]):
        if b0 <= a1:
            out.append(f"{hosts[0]}: {pa_} and {pb} overlap for {(min(a1, b1) - b0) / 1e9:.1f} s: the "
                       "connections both recorded then are counted twice (once per file); analyse them one "
                       "at a time, unless their filters split the traffic (here "
                       f"{ha.get('filters')!r} and {hb.get('filters')!r})")
        else:
            gaps.append(((b0 - a1) / 1e9, pa_, pb))
    why = ("(a connection open across a gap shows as one open at the end of the file before and one born "
           "before the file after)")
    if len(gaps) <= 2:
        out += [f"{hosts[0]}: the {g:.1f} s between {a} and {b} were not recorded {why}" for g, a, b in gaps]
    else:  # (a rotated recording: one line, not one per file)
        g, a, b = max(gaps)
        out.append(f"{hosts[0]}: {len(gaps)} gaps between the files were not recorded, {sum(x[0] for x in gaps):.1f} s "
                   f"in all, the longest {g:.1f} s between {a} and {b} {why}")
    return out
