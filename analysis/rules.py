"""The TCP semantics vocabularies and small rules: the one home every path imports.

The live Tracker (analysis/lifecycle.py), the offline frames (tcplife_trace/frames/lifecycles.py,
frames/filters.py), the tcpstates import and the views read these names from here; the
kernel's fold (ebpf/tcplife.bpf.c, constants in ebpf/event.h) spells the same rules in C, and
tests/test_rules.py holds the two equal by parsing the C. How a connection ended is
analysis/end_rules.py's (it uses TIME_WAIT_FROM and END_REASONS from here).

The rules that take states are written with `&`, `|` and `==` only, so the same expression
runs on plain ints and on numpy columns.
"""
from __future__ import annotations

from tcplife_trace.probes.tcp_states import TcpState as S

# Lifecycle.role; also the order of the frames' role categories
ROLES = ("active", "passive", "listener", "unknown")
# struct tlt_event.role (TLT_ROLE_*): index = the kernel's code
KERNEL_ROLES = ("unknown", "active", "passive", "listener")

# Lifecycle.owner_source, strongest first; index = struct tlt_agg.owner_src (TLT_SRC_*)
OWNER_SOURCES = ("connect", "listen", "io", "close", "listener", "none")
OWNER_RANK = {s: i for i, s in enumerate(OWNER_SOURCES)}
SRC_NONE = OWNER_RANK["none"]

END_REASONS = ("active_close", "passive_close", "reset_by_peer", "local_abort", "refused",
               "timeout", "listener_closed", "unknown")

# (old, new) of the transition that is a connection's birth -> its role
BIRTHS = {(int(S.CLOSE), int(S.SYN_SENT)): "active", (int(S.CLOSE), int(S.LISTEN)): "listener",
          (int(S.LISTEN), int(S.SYN_RECV)): "passive"}

# transitions that always run in the acting process (kernel-facts §2): close(), shutdown()
CLOSERS = frozenset((int(a), int(b)) for a, b in ((S.ESTABLISHED, S.FIN_WAIT1), (S.SYN_RECV, S.FIN_WAIT1),
                                                  (S.CLOSE_WAIT, S.LAST_ACK), (S.LISTEN, S.CLOSE)))
# the acting transitions: their current task is the connection's owner, by this source
# (a passive birth runs in softirq: its owner is the listener's, source "listener")
ACTING = {(int(S.CLOSE), int(S.SYN_SENT)): "connect", (int(S.CLOSE), int(S.LISTEN)): "listen",
          **dict.fromkeys(sorted(CLOSERS), "close")}

# a role told by one transition of a connection whose birth was not seen; the first that holds
ROLE_HINTS = (
    ("listener", lambda old, new: ((old == S.LISTEN) & (new == S.CLOSE)) | (new == S.LISTEN)),
    ("active", lambda old, new: (old == S.SYN_SENT) | (new == S.SYN_SENT)),
    ("passive", lambda old, new: (old == S.SYN_RECV) | (new == S.SYN_RECV)),
)


def guess_role(old: int, new: int, current: str) -> str:
    """The role one transition tells (ROLE_HINTS), else `current`."""
    for role, test in ROLE_HINTS:
        if test(old, new):
            return role
    return current


# the states whose CLOSE means a TIME_WAIT follows (the kernel swaps in a timewait socket,
# which the state tracepoint does not report), unless the connection received a reset
TIME_WAIT_FROM = (int(S.FIN_WAIT2), int(S.CLOSING))


def time_wait_from(before):
    """The CLOSE left `before` for TIME_WAIT (scalar or numpy column)."""
    return (before == TIME_WAIT_FROM[0]) | (before == TIME_WAIT_FROM[1])


def enters_time_wait(before: int, rst_received: bool) -> bool:
    """Transition.note "TIME_WAIT": a CLOSE from FIN_WAIT2 or CLOSING without a reset received."""
    return before in TIME_WAIT_FROM and not rst_received


# the handshake: the time in the state a connection is born into, when it left that state for
# ESTABLISHED (a client's SYN_SENT, an accepted socket's SYN_RECV); none for a connection that
# never got there (refused, timed out) or whose birth was not seen (no time in it is known)
HANDSHAKE_STATE = {"active": int(S.SYN_SENT), "passive": int(S.SYN_RECV)}
_ESTABLISHED = int(S.ESTABLISHED)


def handshake_ns(role: str, path, state_ns: dict) -> int | None:
    """Handshake time (ns) of a lifecycle from its path and per-state times, or None."""
    st = HANDSHAKE_STATE.get(role)
    if st is None or st not in state_ns:
        return None
    for old, new in zip(path, path[1:]):
        if old == st:
            return state_ns[st] if new == _ESTABLISHED else None
    return None
