"""Kernel TCP state numbers and their names (bcc's spelling: CLOSE, not CLOSED)."""
from __future__ import annotations

import enum


class TcpState(enum.IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


STATE_NAMES = {s.value: s.name for s in TcpState}


def state_name(num: int) -> str:
    return STATE_NAMES.get(num, f"STATE_{num}")
