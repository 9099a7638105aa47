"""Struct member offsets read from the running kernel's BTF.

The BPF program includes no kernel header, so every struct field it reads
goes through an offset resolved here from /sys/kernel/btf/vmlinux. Offsets
from mismatched headers are what make bcc's tcplife print garbage byte
counts; offsets from BTF are the kernel's own.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_BTF_MAGIC = 0xEB9F
# kinds (include/uapi/linux/btf.h)
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)
# bytes that follow the 12-byte common header: (fixed, per vlen item)
_TRAILER = {
    _INT: (4, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12), _ENUM: (0, 8),
    _FUNC_PROTO: (0, 8), _VAR: (4, 0), _DATASEC: (0, 12), _DECL_TAG: (4, 0), _ENUM64: (0, 12),
}
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)

# What the BPF program reads, as cflag name -> (struct, member path).
FIELDS = {
    "OFF_SKC_NET": ("sock_common", "skc_net"),
    "OFF_NET_NS_INUM": ("net", "ns.inum"),
    "OFF_SK_UID": ("sock", "sk_uid"),
    "OFF_TP_BYTES_ACKED": ("tcp_sock", "bytes_acked"),
    "OFF_TP_BYTES_RECEIVED": ("tcp_sock", "bytes_received"),
}


class BTFError(Exception):
    pass


@dataclass
class _Type:
    kind: int
    name_off: int
    vlen: int
    kind_flag: bool
    size_or_type: int
    data: int  # offset of the trailing data in the blob


class BTF:
    """Just enough of a BTF reader to resolve member offsets of named structs."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BTFError("file too short for a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != _BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._blob = blob
        self._strs = hdr_len + str_off
        self._str_end = self._strs + str_len
        self._types: list[_Type | None] = [None]  # type id 0 is void
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<III").unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack(blob, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            fixed, per = _TRAILER.get(kind, (0, 0))
            self._types.append(_Type(kind, name_off, vlen, bool(info >> 31), size_or_type, pos + 12))
            pos += 12 + fixed + per * vlen
        self._by_name: dict[str, int] | None = None

    def _name(self, off: int) -> str:
        start = self._strs + off
        return self._blob[start:self._blob.index(b"\0", start)].decode()

    def _struct_id(self, name: str) -> int:
        if self._by_name is None:
            self._by_name = {}
            for tid, t in enumerate(self._types):
                if t is not None and t.kind == _STRUCT and t.name_off and t.vlen:
                    self._by_name.setdefault(self._name(t.name_off), tid)
        try:
            return self._by_name[name]
        except KeyError:
            raise BTFError(f"struct {name} not in BTF") from None

    def _strip(self, tid: int) -> _Type:
        t = self._types[tid]
        while t is not None and t.kind in _MODIFIERS:
            t = self._types[t.size_or_type]
        if t is None:
            raise BTFError("member of void type")
        return t

    def _member_bits(self, t: _Type, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of member `name`, looking into anonymous members."""
        for i in range(t.vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", self._blob, t.data + 12 * i)
            bits = m_off & 0xFFFFFF if t.kind_flag else m_off
            if m_name and self._name(m_name) == name:
                return bits, m_type
            if not m_name:
                inner = self._strip(m_type)
                if inner.kind in (_STRUCT, _UNION):
                    found = self._member_bits(inner, name)
                    if found:
                        return bits + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` (dotted, through nested members; [i] for an array element)
        inside `struct_name`."""
        return _walk(self, struct_name, path)[0]


MAX_OFFSET = 1 << 16  # no field this program reads lies farther into its struct (tcp_sock: ~2.3 KB)


class CacheInvalid(Exception):
    """A cached entry that is not trusted; the message says why."""


def build_id(notes_path: str = "/sys/kernel/notes") -> str | None:
    """The running kernel's GNU build id (hex), from its ELF notes; None if unreadable."""
    try:
        with open(notes_path, "rb") as f:
            blob = f.read(1 << 16)
    except OSError:
        return None
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, kind = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if end > len(blob):
            return None
        if kind == 3 and blob[name_at:name_at + namesz].rstrip(b"\0") == b"GNU":  # NT_GNU_BUILD_ID
            return blob[desc_at:desc_at + descsz].hex()
        pos = end
    return None


def cache_key(st: os.stat_result) -> dict:
    """What a cached entry must match: this kernel's build (build id, release) and its BTF (size)."""
    return {"release": os.uname().release, "build_id": build_id(), "btf_size": st.st_size}


def cache_dir() -> str:
    return os.environ.get("TCPLIFE_TRACE_CACHE", "/run/tcplife-trace")


def _cache_path(key: dict) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"btf-offsets-{digest}.json")


def _trusted_place(*paths: str) -> None:
    """CacheInvalid unless these (the cache's directory, its file) belong to us and only we can
    write them: whoever can write there chooses the offsets compiled into a program the kernel runs."""
    me = os.geteuid()
    for p in paths:
        st = os.lstat(p)
        if st.st_uid != me or st.st_mode & 0o022:
            raise CacheInvalid(f"{p} is owned by uid {st.st_uid}, mode {st.st_mode & 0o7777:o} "
                               f"(want uid {me}, not writable by group or others)")


def read_cache(path: str, key: dict) -> tuple[dict[str, int], list[str]]:
    """(offsets, notes) of a cached entry after checking every value; CacheInvalid otherwise,
    FileNotFoundError when there is none. The values are pasted into the BPF program's text:
    only known names with integers in range get through."""
    _trusted_place(os.path.dirname(path), path)
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    try:
        saved = json.loads(raw)
    except ValueError:
        raise CacheInvalid("not JSON") from None
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise CacheInvalid("made for another kernel build or BTF (key differs)")
    offsets, notes = saved.get("offsets"), saved.get("notes")
    if not isinstance(offsets, dict) or not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise CacheInvalid("malformed entry")
    for name, value in offsets.items():
        if name not in FIELDS:
            raise CacheInvalid(f"unknown field {name!r}")
        if type(value) is not int or not 0 <= value < MAX_OFFSET:
            raise CacheInvalid(f"{name} is {value!r}, not an offset in [0, {MAX_OFFSET})")
    return offsets, notes


def forget_cache(path: str = VMLINUX_BTF) -> None:
    """Remove the cached entry for this kernel (the next kernel_offsets() reads BTF again)."""
    try:
        os.unlink(_cache_path(cache_key(os.stat(path))))
    except OSError:
        pass


def kernel_offsets(path: str = VMLINUX_BTF, use_cache: bool = True) -> tuple[dict[str, int], list[str]]:
    """Offsets for FIELDS from the kernel's BTF, and notes on what is missing.

    Missing fields are left out (the BPF side then reports them as unknown);
    they are never guessed. Results are cached per kernel build in /run, and a
    cached entry is used only if every value checks out (read_cache); one that
    does not is replaced, with a note saying so. The tracer also checks at start
    what the offsets read (probes/offset_check.py).
    """
    try:
        st = os.stat(path)
    except OSError:
        return {}, [f"no kernel BTF at {path}: netns, uid and byte counts will be unknown"]
    key = cache_key(st)
    cache = _cache_path(key) if use_cache else None
    distrusted = None
    if cache:
        try:
            return read_cache(cache, key)
        except FileNotFoundError:
            pass
        except (OSError, CacheInvalid) as e:
            distrusted = f"the BTF offset cache {cache} was not used ({e}): offsets read again from {path}"
    try:
        with open(path, "rb") as f:
            btf = BTF(f.read())
    except (OSError, BTFError, struct.error) as e:
        return {}, [f"cannot read kernel BTF {path} ({e}): netns, uid and byte counts will be unknown"]
    offsets, notes = {}, []
    for macro, (sname, member) in FIELDS.items():
        try:
            offsets[macro] = btf.offset(sname, member)
        except BTFError as e:
            notes.append(f"{e}: the field it feeds will be unknown")
    if cache:
        _write_cache(cache, {"key": key, "offsets": offsets, "notes": notes})
    return offsets, notes + ([distrusted] if distrusted else [])


def _write_cache(cache: str, entry: dict) -> None:
    try:
        d = os.path.dirname(cache)
        os.makedirs(d, mode=0o700, exist_ok=True)
        _trusted_place(d)
    except (OSError, CacheInvalid):
        return  # a place others can write to is not used at all
    tmp = f"{cache}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# -- health at CLOSE, and the kernel's reset reasons (issue 15) ------------------------------
# What the kernel half reads from struct tcp_sock at CLOSE, as raw name -> member path (offsets
# from the start of struct tcp_sock: inet_connection_sock and sock are its first members);
# probes/health.from_tcp_sock turns the values read into the health columns.
TCP_SOCK_HEALTH = {
    "srtt_us": "srtt_us",                 # << 3
    "mdev_us": "mdev_us",                 # << 2
    "rtt_min": "rtt_min.s[0].v",          # struct minmax: the current minimum's value
    "total_retrans": "total_retrans",
    "bytes_retrans": "bytes_retrans",
    "segs_in": "segs_in",
    "segs_out": "segs_out",
    "data_segs_in": "data_segs_in",
    "data_segs_out": "data_segs_out",
    "lost_out": "lost_out",
    "reordering": "reordering",
    "delivered": "delivered",
    "rate_delivered": "rate_delivered",   # the delivery rate's inputs (tcp_compute_delivery_rate)
    "rate_interval_us": "rate_interval_us",
    "mss_cache": "mss_cache",
    "snd_cwnd": "snd_cwnd",
    "rcv_rtt_us": "rcv_rtt_est.rtt_us",   # << 3
    "icsk_retransmits": "inet_conn.icsk_retransmits",  # unrecovered RTO timeouts now
}
RST_REASON_ENUM = "sk_rst_reason"
RST_REASON_PREFIX = "SK_RST_REASON_"  # tcp_send_reset's format prints the names without it


@dataclass(frozen=True)
class Member:
    offset: int   # bytes from the start of the struct
    size: int     # bytes: what the BPF program reads (1, 2, 4 or 8)


def _type_size(btf: BTF, tid: int) -> int:
    t = btf._strip(tid)
    if t.kind in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT):
        return t.size_or_type
    if t.kind == _PTR:
        return 8
    if t.kind == _ARRAY:
        elem, _index, n = struct.unpack_from("<III", btf._blob, t.data)
        return _type_size(btf, elem) * n
    raise BTFError(f"no size for BTF kind {t.kind}")


def member(btf: BTF, struct_name: str, path: str) -> Member:
    """Offset and size of `path` inside `struct_name`: dotted, through nested members, with
    [i] for an array element ("rtt_min.s[0].v"). BTFError if the BTF lacks any part."""
    total, tid = _walk(btf, struct_name, path)
    return Member(total, _type_size(btf, tid))


def _walk(btf: BTF, struct_name: str, path: str) -> tuple[int, int]:
    """(byte offset, type id) of `path` inside `struct_name` (see member)."""
    t = btf._types[btf._struct_id(struct_name)]
    total, tid = 0, None
    for part in path.split("."):
        name, _, index = part.partition("[")
        if t.kind not in (_STRUCT, _UNION):
            raise BTFError(f"{struct_name}.{path}: {name!r} is inside a non-struct")
        found = btf._member_bits(t, name)
        if found is None:
            raise BTFError(f"no member {name!r} in struct {struct_name} (path {path})")
        bits, tid = found
        if bits % 8:
            raise BTFError(f"{struct_name}.{path} is a bitfield")
        total += bits // 8
        if index:
            arr = btf._strip(tid)
            if arr.kind != _ARRAY:
                raise BTFError(f"{struct_name}.{path}: {name} is not an array")
            elem, _index, n = struct.unpack_from("<III", btf._blob, arr.data)
            i = int(index.rstrip("]"))
            if not 0 <= i < n:
                raise BTFError(f"{struct_name}.{path}: index {i} outside {name}[{n}]")
            total += i * _type_size(btf, elem)
            tid = elem
        t = btf._strip(tid)
    return total, tid


def _load(path: str) -> BTF:
    with open(path, "rb") as f:
        return BTF(f.read())


def health_fields(path: str = VMLINUX_BTF, btf: BTF | None = None) -> tuple[dict[str, Member | None], list[str]]:
    """Every TCP_SOCK_HEALTH field's place in this kernel's struct tcp_sock, None ("absent")
    where its BTF lacks it, with one note per absent field (its column will be NA). An
    unreadable BTF: every field absent, one note."""
    try:
        btf = btf or _load(path)
    except (OSError, BTFError, struct.error) as e:
        return dict.fromkeys(TCP_SOCK_HEALTH), [f"cannot read kernel BTF {path} ({e}): connection health "
                                                "at close will be unknown"]
    out: dict[str, Member | None] = {}
    notes = []
    for name, where in TCP_SOCK_HEALTH.items():
        try:
            m = member(btf, "tcp_sock", where)
        except BTFError as e:
            out[name] = None
            notes.append(f"{e}: {name} at close will be NA")
            continue
        if m.size not in (1, 2, 4, 8) or m.offset >= MAX_OFFSET:
            out[name] = None
            notes.append(f"tcp_sock.{where} is {m.size} bytes at {m.offset}: not read, {name} at close will be NA")
            continue
        out[name] = m
    return out, notes


def health_cflags(fields: dict[str, Member | None]) -> dict[str, int]:
    """The fields present as C macros for the kernel half: OFF_TP_<NAME> (offset) and
    SZ_TP_<NAME> (size); an absent field has neither (the program leaves it unread)."""
    out = {}
    for name, m in fields.items():
        if m is not None:
            out[f"OFF_TP_{name.upper()}"] = m.offset
            out[f"SZ_TP_{name.upper()}"] = m.size
    return out


def enum_values(btf: BTF, enum_name: str) -> dict[int, str]:
    """value -> name of every enumerator of `enum enum_name` (ENUM or ENUM64); BTFError if absent."""
    for t in btf._types:
        if t is None or t.kind not in (_ENUM, _ENUM64) or not t.name_off or btf._name(t.name_off) != enum_name:
            continue
        out = {}
        for i in range(t.vlen):
            if t.kind == _ENUM:
                name_off, val = struct.unpack_from("<Ii" if t.kind_flag else "<II", btf._blob, t.data + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", btf._blob, t.data + 12 * i)
                val = lo | hi << 32
                if t.kind_flag and val >= 1 << 63:
                    val -= 1 << 64
            out[val] = btf._name(name_off)
        return out
    raise BTFError(f"enum {enum_name} not in BTF")


def rst_reason_names(path: str = VMLINUX_BTF, btf: BTF | None = None) -> tuple[dict[int, str], list[str]]:
    """tcp_send_reset's reason numbers -> the kernel's names as its tracepoint prints them
    (enum sk_rst_reason without SK_RST_REASON_: NOT_SPECIFIED, TCP_ABORT_ON_CLOSE, ...), read
    from this kernel's BTF (the numbering differs between kernels); {} and a note when the BTF
    has no such enum (kernels before 6.10: tcp_send_reset carries no reason)."""
    try:
        btf = btf or _load(path)
        values = enum_values(btf, RST_REASON_ENUM)
    except (OSError, BTFError, struct.error) as e:
        return {}, [f"{e}: reset reasons will be shown by number"]
    return {v: n.removeprefix(RST_REASON_PREFIX) for v, n in values.items()}, []
