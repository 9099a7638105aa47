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
        """Byte offset of `path` (dotted, through nested members) inside `struct_name`."""
        t = self._types[self._struct_id(struct_name)]
        total = 0
        for part in path.split("."):
            found = self._member_bits(t, part)
            if found is None:
                raise BTFError(f"no member {part!r} in struct {struct_name} (path {path})")
            bits, tid = found
            if bits % 8:
                raise BTFError(f"{struct_name}.{path} is a bitfield")
            total += bits // 8
            t = self._strip(tid)
        return total


def _cache_path(release: str, st: os.stat_result) -> str:
    key = hashlib.sha1(f"{release}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = os.environ.get("TCPLIFE_TRACE_CACHE", "/run/tcplife-trace")
    return os.path.join(base, f"btf-offsets-{key}.json")


def kernel_offsets(path: str = VMLINUX_BTF, use_cache: bool = True) -> tuple[dict[str, int], list[str]]:
    """Offsets for FIELDS from the kernel's BTF, and notes on what is missing.

    Missing fields are left out (the BPF side then reports them as unknown);
    they are never guessed. Results are cached per kernel build in /run.
    """
    try:
        st = os.stat(path)
    except OSError:
        return {}, [f"no kernel BTF at {path}: netns, uid and byte counts will be unknown"]
    cache = _cache_path(os.uname().release, st) if use_cache else None
    if cache:
        try:
            with open(cache) as f:
                saved = json.load(f)
            return saved["offsets"], saved["notes"]
        except (OSError, ValueError, KeyError):
            pass
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
        try:
            os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"offsets": offsets, "notes": notes}, f)
            os.replace(tmp, cache)
        except OSError:
            pass
    return offsets, notes
