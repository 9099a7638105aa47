"""Per-namespace TCP counters and settings the detectors need, read inside each namespace.

The MIBs cover what no tracepoint shows: SYN cookies, listen queue overflows and
drops, request-queue-full drops, embryonic resets (kernel-facts §4). The sysctls
bound TIME_WAIT pressure (the ephemeral port range and the reuse settings) and give the
timer rules the socket ages follow. A sysctl this kernel does not have is left out.
"""
from __future__ import annotations

MIBS = ("SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed", "ListenOverflows", "ListenDrops",
        "TCPReqQFullDrop", "TCPReqQFullDoCookies", "EmbryonicRsts", "TCPSynRetrans",
        "TCPTimeWaitOverflow", "TCPAbortOnTimeout")
SYSCTLS = {
    "ip_local_port_range": "/proc/sys/net/ipv4/ip_local_port_range",
    "tcp_tw_reuse": "/proc/sys/net/ipv4/tcp_tw_reuse",
    "tcp_max_tw_buckets": "/proc/sys/net/ipv4/tcp_max_tw_buckets",
    "tcp_syncookies": "/proc/sys/net/ipv4/tcp_syncookies",
    "tcp_max_syn_backlog": "/proc/sys/net/ipv4/tcp_max_syn_backlog",
    "somaxconn": "/proc/sys/net/core/somaxconn",
    "tcp_fin_timeout": "/proc/sys/net/ipv4/tcp_fin_timeout",
    "tcp_synack_retries": "/proc/sys/net/ipv4/tcp_synack_retries",
    # the SYN retransmission schedule, for the ages of SYN_SENT sockets (probes/socket_age.py)
    "tcp_syn_linear_timeouts": "/proc/sys/net/ipv4/tcp_syn_linear_timeouts",
    "tcp_rto_max_ms": "/proc/sys/net/ipv4/tcp_rto_max_ms",
}


def mibs_here() -> dict[str, int]:
    """TcpExt counters of the calling thread's namespace (only those in MIBS)."""
    out: dict[str, int] = {}
    with open("/proc/thread-self/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        prefix, _, names = names.partition(":")
        if prefix != "TcpExt":
            continue
        for k, v in zip(names.split(), values.partition(":")[2].split()):
            if k in MIBS:
                out[k] = int(v)
    return out


def sysctls_here() -> dict[str, object]:
    out: dict[str, object] = {}
    for key, path in SYSCTLS.items():
        try:
            with open(path) as f:
                text = f.read().split()
        except OSError:
            continue
        out[key] = tuple(int(x) for x in text) if len(text) > 1 else int(text[0])
    return out


def sockstat_here() -> dict[str, int]:
    """The `TCP:` line of /proc/net/sockstat: inuse, orphan, tw, alloc, mem (cheap counts)."""
    with open("/proc/thread-self/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {k: int(v) for k, v in zip(parts[::2], parts[1::2])}
    return {}
