"""A TCP connection's health, the same columns whichever way the kernel tells it: sock_diag's
tcp_info (open sockets, now) or the tcp_sock fields a BPF program reads at CLOSE through BTF
offsets (probes/btf.health_fields). NA (None), never 0, for what the kernel did not give, and
for its "no sample yet" values (as `ss -ti` leaves them out)."""
from __future__ import annotations

import struct

from .btf import TCP_SOCK_HEALTH

# column -> (byte offset in struct tcp_info, format, scale); include/uapi/linux/tcp.h (the struct
# only grows, at its end). Times are the kernel's microseconds as milliseconds; delivery_rate is
# bytes per second (ss -ti prints bits per second).
TCP_INFO = {
    "rtt_ms": (68, "I", 1e-3),            # srtt_us >> 3
    "rttvar_ms": (72, "I", 1e-3),         # mdev_us >> 2
    "min_rtt_ms": (148, "I", 1e-3),       # windowed minimum (tcp_min_rtt: rtt_min.s[0].v)
    "total_retrans": (100, "I", None),    # segments retransmitted over the connection's life
    "bytes_retrans": (208, "Q", None),
    "segs_in": (140, "I", None),
    "segs_out": (136, "I", None),
    "data_segs_in": (152, "I", None),
    "data_segs_out": (156, "I", None),
    "lost": (32, "I", None),              # lost_out: segments thought lost now
    "reordering": (88, "I", None),        # the reordering degree (tp->reordering)
    "delivered": (192, "I", None),
    "delivery_rate": (160, "Q", None),    # the latest delivery rate sample
    "snd_cwnd": (80, "I", None),          # segments
    "rcv_rtt_ms": (92, "I", 1e-3),        # receiver-side RTT estimate (rcv_rtt_est.rtt_us >> 3)
}
COLUMNS = tuple(TCP_INFO)
NO_MIN_RTT = 0xFFFFFFFF  # minmax's initial ~0U: no sample


# every field in one unpack, for a tcp_info that holds them all (the usual case: a look at
# many sockets parses each one's)
_ORDER = sorted(TCP_INFO, key=lambda n: TCP_INFO[n][0])
_FULL_LEN = max(off + struct.calcsize(fmt) for off, fmt, _ in TCP_INFO.values())


def _full_struct() -> struct.Struct:
    fmt, at = "<", 0
    for name in _ORDER:
        off, f, _ = TCP_INFO[name]
        fmt += (f"{off - at}x" if off > at else "") + f   # (padding over the fields not used)
        at = off + struct.calcsize(f)
    return struct.Struct(fmt)


_FULL = _full_struct()
assert _FULL.size == _FULL_LEN


def from_tcp_info(raw: bytes) -> dict[str, float | int | None]:
    """The columns of one raw tcp_info, as long as the kernel returned it: a field at or beyond
    its end is None (an older kernel's struct is shorter)."""
    out: dict[str, float | int | None] = {}
    if len(raw) >= _FULL_LEN:
        for name, v in zip(_ORDER, _FULL.unpack_from(raw)):
            scale = TCP_INFO[name][2]
            out[name] = round(v * scale, 3) if scale else v
        return _no_samples({n: out[n] for n in COLUMNS})
    for name, (off, fmt, scale) in TCP_INFO.items():
        if off + struct.calcsize(fmt) > len(raw):
            out[name] = None
        else:
            v = struct.unpack_from("<" + fmt, raw, off)[0]
            out[name] = round(v * scale, 3) if scale else v
    return _no_samples(out)


def _no_samples(out: dict) -> dict:
    if out["rtt_ms"] == 0:      # no RTT sample: nor its variation
        out["rtt_ms"] = out["rttvar_ms"] = None
    if out["rcv_rtt_ms"] == 0:
        out["rcv_rtt_ms"] = None
    if out["min_rtt_ms"] is not None and out["min_rtt_ms"] == round(NO_MIN_RTT * 1e-3, 3):
        out["min_rtt_ms"] = None
    return out


def from_tcp_sock(raw: dict[str, int | None]) -> dict[str, float | int | None]:
    """The columns from the struct tcp_sock fields read in the kernel (btf.TCP_SOCK_HEALTH names;
    None: the field is absent from this kernel's BTF), computed as tcp_get_info() does."""
    def get(name):
        return raw.get(name)

    def us(v, shift):
        return None if v is None else round((v >> shift) / 1000, 3)

    rate = None
    d, intv, mss = get("rate_delivered"), get("rate_interval_us"), get("mss_cache")
    if None not in (d, intv, mss):
        rate = d * mss * 1_000_000 // intv if d and intv else 0
    out = {"rtt_ms": us(get("srtt_us"), 3), "rttvar_ms": us(get("mdev_us"), 2),
           "min_rtt_ms": us(get("rtt_min"), 0), "total_retrans": get("total_retrans"),
           "bytes_retrans": get("bytes_retrans"), "segs_in": get("segs_in"), "segs_out": get("segs_out"),
           "data_segs_in": get("data_segs_in"), "data_segs_out": get("data_segs_out"),
           "lost": get("lost_out"), "reordering": get("reordering"), "delivered": get("delivered"),
           "delivery_rate": rate, "snd_cwnd": get("snd_cwnd"), "rcv_rtt_ms": us(get("rcv_rtt_us"), 3)}
    assert tuple(out) == COLUMNS
    return _no_samples(out)


_NO_HEALTH = dict.fromkeys(COLUMNS)


def from_fold(raw: tuple | None) -> dict[str, float | int | None]:
    """The columns from a LIFE record's health (Lifecycle.health_raw: (health_mask, the values in
    btf.TCP_SOCK_HEALTH order)); every column NA when nothing was read (None)."""
    if raw is None:
        return dict(_NO_HEALTH)

    mask, values = raw
    if isinstance(values, (bytes, bytearray)):  # (a decoded LIFE record's health[], as it came)
        values = struct.unpack(f"<{len(values) // 8}Q", values)
    return from_tcp_sock({name: v if mask >> i & 1 else None
                          for i, (name, v) in enumerate(zip(TCP_SOCK_HEALTH, values))})


def fold_columns(mask, values) -> dict:
    """from_fold for many LIFE records at once (numpy: health_mask (n,), health values (n,
    HEALTH_N)): column -> (values, valid), valid False where from_fold gives None."""
    import numpy as np
    mask = np.asarray(mask, dtype=np.uint64)
    values = np.asarray(values, dtype=np.uint64).reshape(len(mask), -1)
    at = {name: i for i, name in enumerate(TCP_SOCK_HEALTH)}

    def raw(name):
        i = at[name]
        return values[:, i], ((mask >> np.uint64(i)) & np.uint64(1)) == 1

    def ms(name, shift):
        v, ok = raw(name)
        return np.round((v >> np.uint64(shift)).astype(np.float64) / 1000, 3), ok

    out = {}
    rtt, rtt_ok = ms("srtt_us", 3)
    var, var_ok = ms("mdev_us", 2)
    sampled = rtt != 0
    out["rtt_ms"], out["rttvar_ms"] = (rtt, rtt_ok & sampled), (var, var_ok & (sampled | ~rtt_ok))
    mn, mn_ok = ms("rtt_min", 0)
    out["min_rtt_ms"] = (mn, mn_ok & (mn != round(NO_MIN_RTT * 1e-3, 3)))
    for col, name in (("total_retrans", "total_retrans"), ("bytes_retrans", "bytes_retrans"),
                      ("segs_in", "segs_in"), ("segs_out", "segs_out"), ("data_segs_in", "data_segs_in"),
                      ("data_segs_out", "data_segs_out"), ("lost", "lost_out"), ("reordering", "reordering"),
                      ("delivered", "delivered"), ("snd_cwnd", "snd_cwnd")):
        v, ok = raw(name)
        out[col] = (v.astype(np.int64), ok)
    (d, d_ok), (intv, i_ok), (mss, m_ok) = raw("rate_delivered"), raw("rate_interval_us"), raw("mss_cache")
    dm = d * mss  # (both 32-bit: no overflow) ; times 10^6 would overflow past ~1.8e13
    rate = np.where((d != 0) & (intv != 0), dm * np.uint64(1_000_000) // np.maximum(intv, np.uint64(1)), 0)
    for i in np.flatnonzero((dm > np.uint64(18_000_000_000_000)) & (intv != 0)):  # (exact, as tcp_get_info)
        rate[i] = min(int(dm[i]) * 1_000_000 // int(intv[i]), (1 << 63) - 1)
    out["delivery_rate"] = (rate.astype(np.int64), d_ok & i_ok & m_ok)
    rcv, rcv_ok = ms("rcv_rtt_us", 3)
    out["rcv_rtt_ms"] = (rcv, rcv_ok & (rcv != 0))
    return {c: out[c] for c in COLUMNS}
