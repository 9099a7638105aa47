"""How a connection ended: the one home of the rule, for every path.

The live state machine (analysis/lifecycle.py, the stream and the kernel's folds alike)
classifies one connection at a time; the offline frames (tcplife_trace/lifecycle_frame.py)
classify whole columns. Both call this table: each rule's test is written with `&`, `|`
and `==` only, so the same expression runs on plain Python values and on numpy arrays.

What the rules read about a connection (`Ends`):
  listener    it was a listening socket
  open        no end seen yet (offline: its last transition is not a CLOSE)
  before      the state it left for CLOSE (0: no CLOSE seen, e.g. destroyed without one)
  rr          it received an RST (tcp_receive_reset)
  errno       the error the kernel reported on the socket at its end (-1: none; 0: reported,
              but its owner had read it already, see below)
  rst_sent    it sent an RST (tcp_send_reset) before its end
  rst_reason  that RST's enum sk_rst_reason (-1: none or unknown)

The errno shown for a connection is the one its owner was told (connect(), recv(), send()
or SO_ERROR returned it). A local abort (SO_LINGER 0, or a listener closed with children not
yet accepted) makes the kernel report ECONNRESET to the aborting socket itself, which its
owner has already closed: nobody saw it, so none is shown.

sock:inet_sk_error_report reads sk_err after the kernel has woken the socket's waiters; an
application waiting on another CPU (poll(), select(), a blocking connect()) may take the
error first (SO_ERROR and the failing call clear it), and the report then says 0. The
error is then the one the kernel's code path sets, known from what it did: an RST in
SYN_SENT is ECONNREFUSED, in CLOSE_WAIT EPIPE, elsewhere ECONNRESET (tcp_reset()); an abort
ECONNRESET (tcp_disconnect()); otherwise a timer gave up (SYN or data retransmissions, or
keepalive probes), ETIMEDOUT (tcp_write_err(): or the last ICMP error it had, which the
report does not tell).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..probes.tcp_states import TcpState as S

END_REASONS = ("active_close", "passive_close", "reset_by_peer", "local_abort", "refused",
               "timeout", "listener_closed", "unknown")
ECONNRESET, EPIPE, ETIMEDOUT, ECONNREFUSED = 104, 32, 110, 111
# enum sk_rst_reason values worth naming (include/net/rstreason.h)
RST_REASONS = {1: "no_socket", 11: "abort_on_close", 12: "abort_on_linger", 13: "abort_on_memory",
               14: "tcp_state", 15: "keepalive_timeout", 16: "abort_on_data"}
_KEEPALIVE = 15
CONNECT_ABANDONED = ("connect abandoned: the application closed it in SYN_SENT before any answer "
                     "(its own connect timeout); the kernel reported no error")


class Ends(NamedTuple):
    listener: object
    open: object
    before: object
    rr: object
    errno: object
    rst_sent: object
    rst_reason: object


def _state(before: int) -> str:
    try:
        return S(before).name
    except ValueError:
        return str(before)


def rst_reason_name(reason: int) -> str:
    return RST_REASONS.get(reason, str(reason))


def _timer(f: Ends):
    """An error other than the ones an RST or an abort sets."""
    return (f.errno > 0) & (f.errno != ECONNRESET) & (f.errno != EPIPE) & (f.errno != ECONNREFUSED)


# (end_reason, detail(before, rst_reason) or None, errno shown, test); the first that holds wins
RULES = (
    ("listener_closed", None, True, lambda f: f.listener),
    ("open", None, True, lambda f: f.open),
    ("unknown", None, True, lambda f: f.before == 0),
    ("refused", lambda b, r: "ECONNREFUSED", True,
     lambda f: (f.rr | (f.errno == ECONNREFUSED)) & (f.before == S.SYN_SENT)),
    ("reset_by_peer", lambda b, r: f"RST received in {_state(b)}", True,
     lambda f: f.rr | (f.errno == ECONNREFUSED)),
    ("timeout", lambda b, r: "connect timeout (SYN retries exhausted)", True,
     lambda f: (f.errno == ETIMEDOUT) & (f.before == S.SYN_SENT)),
    # a timer that gave up reports the last ICMP error it had instead of ETIMEDOUT, and an
    # ICMP error in SYN_SENT ends the connect at once (EHOSTUNREACH, ENETUNREACH, ...)
    ("timeout", lambda b, r: "connect failed: destination unreachable (an ICMP error; errno says which)", True,
     lambda f: _timer(f) & (f.before == S.SYN_SENT)),
    ("timeout", lambda b, r: "keepalive probes unanswered", True,
     lambda f: _timer(f) & (f.rst_reason == _KEEPALIVE)),
    ("timeout", lambda b, r: f"retransmissions unanswered in {_state(b)}", True, _timer),
    # before ECONNRESET: an abort (tcp_disconnect) reports ECONNRESET to itself
    ("local_abort", lambda b, r: f"RST sent ({rst_reason_name(r)}) in {_state(b)}", False,
     lambda f: f.rst_sent),
    ("reset_by_peer", lambda b, r: f"RST received in {_state(b)}", True,
     lambda f: (f.errno == ECONNRESET) | (f.errno == EPIPE)),
    ("passive_close", None, True, lambda f: f.before == S.LAST_ACK),
    ("active_close", lambda b, r: "TIME_WAIT (not traced: the kernel swaps in a timewait socket)", True,
     lambda f: (f.before == S.FIN_WAIT2) | (f.before == S.CLOSING)),
    # a blocking connect() with SO_SNDTIMEO, poll()/select() with a timeout, a language's own
    # connect timeout: the application gave up waiting for the SYN-ACK and closed
    ("timeout", lambda b, r: CONNECT_ABANDONED, True, lambda f: f.before == S.SYN_SENT),
    ("local_abort", lambda b, r: "closed during handshake", False, lambda f: f.before == S.SYN_RECV),
    ("unknown", lambda b, r: f"{_state(b)} -> CLOSE with no reset or error seen", True, lambda f: True),
)
_DEFAULT = len(RULES) - 1


def _pick(choices, default):
    """The value of the first true condition: np.select on arrays, plain on scalars."""
    if isinstance(choices[0][0], np.ndarray):
        return np.select([c for c, _ in choices], [v for _, v in choices], default)
    for cond, value in choices:
        if cond:
            return value
    return default


def reported_errno(f: Ends):
    """f.errno, with a report that said 0 replaced by the error the kernel set (see above)."""
    known = _pick([(f.rr & (f.before == S.SYN_SENT), ECONNREFUSED), (f.rr & (f.before == S.CLOSE_WAIT), EPIPE),
                   (f.rr, ECONNRESET), (f.rst_sent & (f.rst_reason == _KEEPALIVE), ETIMEDOUT),
                   (f.rst_sent, ECONNRESET)], ETIMEDOUT)
    return _pick([(f.errno == 0, known)], f.errno)
_cache: dict[Ends, tuple] = {}


def classify(f: Ends) -> tuple[str, str | None, int | None]:
    """(end_reason, end_detail, the errno shown or None) of one connection."""
    hit = _cache.get(f)
    if hit is None:
        f = f._replace(errno=reported_errno(f))
        for reason, detail, shown, test in RULES:
            if test(f):
                hit = (reason, detail(f.before, f.rst_reason) if detail else None,
                       f.errno if shown and f.errno > 0 else None)
                break
        if len(_cache) > 4096:
            _cache.clear()
        _cache[f] = hit
    return hit


def classify_columns(f: Ends) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The same for whole columns (numpy arrays, one row per connection): (rule index per
    row, detail code per row (-1: none), the detail names, the errno shown (-1: none))."""
    f = f._replace(errno=np.asarray(reported_errno(f)))
    rule = np.select([np.asarray(test(f), dtype=bool) for *_, test in RULES[:-1]],
                     np.arange(_DEFAULT), default=_DEFAULT).astype(np.int16)
    before = np.asarray(f.before, dtype=np.int64)
    reason = np.asarray(f.rst_reason, dtype=np.int64)
    key = (rule.astype(np.int64) * 256 + np.clip(before, 0, 255)) * 65536 + np.clip(reason + 1, 0, 65535)
    uniq, inverse = np.unique(key, return_inverse=True)
    names: list[str] = []
    code_of: dict[str, int] = {}
    codes = np.full(len(uniq), -1, dtype=np.int16)
    for i, k in enumerate(uniq):
        r, rest = divmod(int(k), 256 * 65536)
        b, rr = divmod(rest, 65536)
        detail = RULES[r][1]
        if detail is not None:
            text = detail(b, rr - 1)
            codes[i] = code_of.setdefault(text, len(names))
            if codes[i] == len(names):
                names.append(text)
    shown = np.array([s for _, _, s, _ in RULES], dtype=bool)[rule] & (f.errno > 0)
    return rule, codes[inverse.reshape(-1)], names, np.where(shown, f.errno, -1)


REASON_OF_RULE = [r for r, *_ in RULES]
