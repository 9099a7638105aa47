"""Where the tracepoints are, and which of them this kernel has."""
from __future__ import annotations

import os
import subprocess

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# The spine, then what the lifecycle uses to explain it. Each missing optional
# tracepoint costs one feature, named in a notice.
REQUIRED = ("sock", "inet_sock_set_state")
OPTIONAL = {
    ("tcp", "tcp_destroy_sock"): "socket ends are taken from CLOSE only (entries live until then)",
    ("tcp", "tcp_receive_reset"): "resets received are not told apart from other closes",
    ("tcp", "tcp_send_reset"): "local aborts are not told apart from other closes",
    ("sock", "inet_sk_error_report"): "no errno for refused/timed-out/reset connections",
    ("sock", "sock_recv_length"): "accepted sockets are attributed to the closer or listener, not the reader",
    ("sock", "sock_send_length"): "accepted sockets are attributed to the closer or listener, not the writer",
    ("tcp", "tcp_retransmit_synack"): "SYN-ACK retransmits (half-open handshakes) are not counted per listener",
    ("tcp", "tcp_retransmit_skb"): "retransmits are not counted as they happen (retransmits, syn_retransmits are NA)",
    ("tcp", "tcp_cong_state_set"): "loss and recovery episodes are not counted (recoveries, losses are NA)",
}


class TracefsError(Exception):
    pass


def find_tracefs(mount: bool = True) -> str:
    """The tracefs root holding events/; mounts it at /sys/kernel/tracing if needed."""
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    if mount and os.path.isdir(TRACEFS_DIRS[0]):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_DIRS[0]],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if os.path.isdir(os.path.join(TRACEFS_DIRS[0], "events")):
            return TRACEFS_DIRS[0]
    raise TracefsError("tracefs is not mounted and could not be mounted: run "
                       "`mount -t tracefs tracefs /sys/kernel/tracing` as root (or add it to /etc/fstab)")


def fields(root: str, category: str, event: str) -> dict[str, str] | None:
    """Field name -> declaration of a tracepoint, or None if this kernel lacks it."""
    path = os.path.join(root, "events", category, event, "format")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except PermissionError as e:
        raise TracefsError(f"cannot read {path} ({e.strerror}): run as root") from None
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        decl = line[len("field:"):].split(";", 1)[0].strip()
        name = decl.split()[-1].split("[", 1)[0]
        if not name.startswith("common_"):
            out[name] = decl
    return out


def probe(root: str) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """The present tracepoints with their fields, and one notice per missing optional one."""
    present, notices = {}, []
    spine = fields(root, *REQUIRED)
    if spine is None:
        raise TracefsError(f"this kernel has no tracepoint {'/'.join(REQUIRED)} (needs Linux >= 4.16): "
                           "tcplife-trace cannot run here")
    present[REQUIRED] = spine
    for tp, loss in OPTIONAL.items():
        f = fields(root, *tp)
        if f is None:
            notices.append(f"tracepoint {'/'.join(tp)} is missing on this kernel: {loss}")
        else:
            present[tp] = f
    return present, notices
