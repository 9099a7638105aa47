"""struct tlt_event (ebpf/event.h) and probes/event_layout.py describe the same bytes."""
import ctypes
import random
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from tcplife_trace import ebpf
from tcplife_trace.probes import btf
from tcplife_trace.probes import decode as dec
from tcplife_trace.analysis.lifecycle import OWNER_SOURCES
from tcplife_trace.probes.event_layout import (AGG_FIELD_NAMES, AGG_SIZE, EVENT_SIZE, HEALTH_N, FIELD_NAMES, LIFE_SIZE, N_KINDS,
                                               PATH_MAX, PIDS_MAX, STAT_NSLOTS, STAT_SPILLED, Event, EventKind,
                                               Flag, Life, LifeFlag, agg_field_offsets, field_offsets)

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef int __s32; typedef unsigned long long __u64;
#include "event.h"
#define F(f) printf("%s %zu\n", #f, offsetof(struct tlt_event, f));
#define A(f) printf("agg.%s %zu\n", #f, offsetof(struct tlt_agg, f));
int main(void) {
    printf("SIZE %zu\nAGGSIZE %zu\nLIFESIZE %zu\n", sizeof(struct tlt_event), sizeof(struct tlt_agg),
           sizeof(struct tlt_life));
    printf("AGGOFF %zu\n", offsetof(struct tlt_life, agg));
    %FIELDS%
    printf("NKINDS %d\nNSLOTS %d\nSPILLED %d\n", TLT_EV_NKINDS, TLT_STAT_NSLOTS, TLT_STAT_SPILLED);
    return 0;
}
"""


def c_layout(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: the layout check needs gcc (apt install gcc)")
    src = tmp_path / "layout.c"
    src.write_text(C_PROGRAM.replace("%FIELDS%", " ".join(f"F({f})" for f in FIELD_NAMES)
                                     + " " + " ".join(f"A({f})" for f in AGG_FIELD_NAMES)))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", ebpf.EBPF_DIR, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_c_and_python_layouts_match(tmp_path):
    c = c_layout(tmp_path)
    assert c.pop("SIZE") == EVENT_SIZE
    assert c.pop("NKINDS") == N_KINDS
    assert c.pop("NSLOTS") == STAT_NSLOTS
    assert c.pop("SPILLED") == STAT_SPILLED
    assert (c.pop("AGGSIZE"), c.pop("LIFESIZE"), c.pop("AGGOFF")) == (AGG_SIZE, LIFE_SIZE, EVENT_SIZE)
    assert {k[4:]: c.pop(k) for k in list(c) if k.startswith("agg.")} == agg_field_offsets()
    assert c == field_offsets()


def test_constants_match_header():
    text = open(ebpf.EVENT_HEADER).read()
    kinds = {m[0]: int(m[1]) for m in re.findall(r"#define TLT_EV_(\w+)\s+(\d+)", text) if m[0] != "NKINDS"}
    assert kinds == {k.name: k.value for k in EventKind}
    flags = {m[0]: int(m[1], 16) for m in re.findall(r"#define TLT_F_(\w+)\s+0x([0-9a-f]+)", text)}
    assert flags == {f.name: f.value for f in Flag}
    lflags = {m[0]: int(m[1], 16) for m in re.findall(r"#define TLT_L_(\w+)\s+0x([0-9a-f]+)", text)}
    assert lflags == {f.name: f.value for f in LifeFlag}
    sources = {m[0].lower(): int(m[1]) for m in re.findall(r"#define TLT_SRC_(\w+)\s+(\d+)", text)}
    assert sources == {s: OWNER_SOURCES.index(s) for s in sources}
    assert int(re.search(r"#define TLT_PATH_MAX (\d+)", text)[1]) == PATH_MAX
    assert int(re.search(r"#define TLT_PIDS_MAX (\d+)", text)[1]) == PIDS_MAX
    # struct tlt_agg.health[]: one slot per btf.TCP_SOCK_HEALTH field, in its order
    slots = {m[0].lower(): int(m[1]) for m in re.findall(r"#define TLT_H_(\w+)\s+(\d+)", text)}
    assert slots == {name: i for i, name in enumerate(btf.TCP_SOCK_HEALTH)}
    assert int(re.search(r"#define TLT_HEALTH_N\s+(\d+)", text)[1]) == HEALTH_N == len(btf.TCP_SOCK_HEALTH)


def test_bpf_program_static_asserts_every_field():
    text = open(ebpf.PROGRAM).read()
    checked = set(re.findall(r"TLT_CHECK\((\w+)\)", text)) - {"f"}
    assert checked == set(FIELD_NAMES)
    checked = set(re.findall(r"TLT_ACHECK\((\w+)\)", text)) - {"f"}
    assert checked == set(AGG_FIELD_NAMES)


def test_life_decoder_agrees_with_ctypes():
    rng = random.Random(2)
    for _ in range(100):
        raw = bytearray(rng.randrange(256) for _ in range(LIFE_SIZE))
        raw[Event.kind.offset] = EventKind.LIFE
        life = Life.from_buffer_copy(bytes(raw))
        (t,) = dec.decode_life_batch(bytes(raw))
        assert dec.Ev._make(t[:dec.N_EV_FIELDS]) == dec.decode(bytes(raw[:EVENT_SIZE]))
        a, i = life.agg, dec.LIFE_INDEX
        for name, _ in type(a)._fields_:
            if name.startswith("_"):
                continue
            want = getattr(a, name)
            got = t[i[name]]
            if name == "health":
                got, want = list(struct.unpack(f"<{len(want)}Q", got)), list(want)
            elif name in ("state_ns", "pids"):
                got, want = list(t[i[name]:i[name] + len(want)]), list(want)
            elif name in ("owner_comm", "listener_comm"):
                got = got.split(b"\0")[0]  # ctypes cuts c_char arrays at the NUL
            elif name == "path":
                want = bytes(want)
            assert got == want, name
        raw[Event.kind.offset] = EventKind.STATE  # any other kind: the event's fields only
        (t,) = dec.decode_life_batch(bytes(raw))
        assert len(t) == dec.N_EV_FIELDS


def test_decoder_agrees_with_ctypes():
    rng = random.Random(1)
    raws = [bytes(rng.randrange(256) for _ in range(EVENT_SIZE)) for _ in range(200)]
    assert dec.decode_many(raws) == [dec.decode(r) for r in raws]
    for raw in raws:
        e = Event.from_buffer_copy(raw)
        d = dec.decode(raw)
        for name in ("ts_ns", "skaddr", "gen", "pid", "tid", "value", "sport", "dport", "kind",
                     "oldstate", "newstate", "flags", "tx_b", "rx_b", "seq"):
            assert getattr(d, name) == getattr(e, name), name
        assert (d.af, d.netns_raw, d.uid_raw) == (e.family, e.netns, e.uid)
        assert d.saddr_raw == bytes(e.saddr) and d.daddr_raw == bytes(e.daddr)
        assert dec.comm(d.comm_raw) == e.comm.split(b"\0")[0].decode(errors="replace")
        assert dec.netns(d) == (e.netns if e.flags & Flag.NETNS else None)
        assert dec.byte_counts(d) == ((e.tx_b, e.rx_b) if e.flags & Flag.BYTES else (None, None))


def test_decoder_addresses_and_v4_mapped():
    import socket
    e = Event(family=socket.AF_INET6, sport=8080, dport=5555, kind=1)
    mapped = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    e.saddr[:] = list(mapped)
    e.daddr[:] = list(mapped)
    d = dec.decode(bytes(e))
    assert (dec.endpoint_family(d), dec.addr(d.af, d.saddr_raw), dec.addr(d.af, d.daddr_raw)) == (
        4, "127.0.0.1", "127.0.0.1")
    e.daddr[:] = list(socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    d = dec.decode(bytes(e))
    assert (dec.endpoint_family(d), dec.addr(d.af, d.daddr_raw)) == (6, "2001:db8::1")
    e.family = 0
    assert dec.endpoint_family(dec.decode(bytes(e))) is None


def test_recording_of_schema_1_loads_with_the_fold_columns_zero(tmp_path):
    """A file written before the kernel's fold was appended to the event (21 columns, up to
    seq) loads, its new columns zero; today's files have every field of struct tlt_event."""
    import json

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from tcplife_trace import load, recording
    from tcplife_trace.probes.event_layout import ARROW_TYPES, V1_FIELD_NAMES
    from synthetic import stream

    rows = [(0, "S", 1, "CLOSE", "SYN_SENT", 10, 0, 80), (1, "S", 1, "SYN_SENT", "ESTABLISHED", 0, 5000, 80),
            (3, "S", 1, "ESTABLISHED", "FIN_WAIT1", 10, 5000, 80), (4, "S", 1, "FIN_WAIT1", "FIN_WAIT2", 0, 5000, 80),
            (5, "S", 1, "FIN_WAIT2", "CLOSE", 0, 5000, 80)]
    events = dec.events_array(stream(rows))
    head = {**recording.header("none", 0), "schema_version": 1, "event_size": 120}
    v1 = [(n, ARROW_TYPES[n]) for n in V1_FIELD_NAMES]
    schema = pa.schema([pa.field(n, t) for n, t in v1], metadata={recording.KEY: json.dumps(head).encode()})
    cols = [pa.Array.from_buffers(t, len(events), [None, pa.py_buffer(np.ascontiguousarray(events[n]).tobytes())])
            for n, t in v1]
    path = tmp_path / "old.arrow"
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
    rec = load(str(path))
    assert rec.events.column_names == list(ARROW_TYPES)
    assert rec.events["xflags"].to_pylist() == [0] * 5 and rec.events["dur_ns"].to_pylist() == [0] * 5
    assert rec.events["sport"].to_pylist() == [0, 5000, 5000, 5000, 5000]
    assert len(rec.transitions) == 5 and list(rec.lifecycles()["end_reason"]) == ["active_close"]
    # today's schema: every field, the fold included
    new = tmp_path / "new.arrow"
    w = recording.RecordingWriter(str(new), recording.header("none", 0))
    w.add(stream(rows))
    w.close({})
    assert load(str(new)).events.column_names == list(ARROW_TYPES)


def test_unpack_format_is_the_ctypes_layout():
    """decode's struct formats are derived from event_layout's ctypes structs (unpack_format):
    every field of Event and Agg, unpacked by the derived format, equals what ctypes reads."""
    from tcplife_trace.probes.event_layout import Agg, unpack_format
    rng = random.Random(3)
    for struct_type in (Event, Agg):
        fmt, slots = unpack_format(struct_type)
        assert struct.calcsize(fmt) == ctypes.sizeof(struct_type)
        for _ in range(50):
            raw = bytes(rng.randrange(256) for _ in range(ctypes.sizeof(struct_type)))
            obj, values = struct_type.from_buffer_copy(raw), struct.unpack(fmt, raw)
            at = 0
            for name, n in slots:
                want = getattr(obj, name)
                got = values[at] if n == 1 else list(values[at:at + n])
                if isinstance(want, bytes):  # a c_char array: ctypes cuts it at the NUL
                    got = got.split(b"\0")[0]
                elif not isinstance(want, int):
                    want = bytes(want) if n == 1 else list(want)
                assert got == want, name
                at += n
