"""How a connection ended: the one home of the rule, for every path.

The live state machine (analysis/lifecycle.py, the stream and the kernel's folds alike)
classifies one connection at a time; the offline frames (tcplife_trace/frames/lifecycles.py)
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

The reason's number is named from this kernel's BTF (enum sk_rst_reason: the numbering
differs between kernels; probes/btf.py rst_reason_names), as tcp_send_reset's format prints
it (TCP_ABORT_ON_CLOSE, ...); a recording keeps the table of the kernel it was made on, and
offline frames name its numbers by that (ResetReasons.from_header). Only when the BTF has no
such enum (kernels before 6.10, whose tcp_send_reset carries no reason) FALLBACK_RST_REASONS.

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

from tcplife_trace.probes.tcp_states import TcpState as S
from .rules import END_REASONS, time_wait_from  # noqa: F401  (END_REASONS: importable from here too)

ECONNRESET, EPIPE, ETIMEDOUT, ECONNREFUSED = 104, 32, 110, 111
# enum sk_rst_reason (include/net/rstreason.h, 6.10-6.12 numbering), used only when the
# kernel's BTF has no such enum
FALLBACK_RST_REASONS = {1: "NO_SOCKET", 8: "TCP_ABORT_ON_DATA", 11: "TCP_ABORT_ON_CLOSE",
                        12: "TCP_ABORT_ON_LINGER", 13: "TCP_ABORT_ON_MEMORY", 14: "TCP_STATE",
                        15: "TCP_KEEPALIVE_TIMEOUT"}
RST_REASONS = FALLBACK_RST_REASONS  # (the old name)
_KEEPALIVE_NAME = "TCP_KEEPALIVE_TIMEOUT"  # a keepalive timer that gave up sends this reset


class ResetReasons:
    """enum sk_rst_reason of one kernel: number -> name, and the keepalive timer's number."""
    __slots__ = ("names", "source", "notes", "keepalive", "_cache")

    def __init__(self, names: dict[int, str], source: str, notes: list[str] | None = None):
        self.names = dict(names)
        self.source = source  # "btf", "recording" or "fallback"
        self.notes = notes or []
        self.keepalive = next((v for v, n in self.names.items() if n == _KEEPALIVE_NAME), -2)
        self._cache: dict = {}

    def name(self, reason: int) -> str:
        return self.names.get(int(reason), str(reason))

    def header_value(self) -> dict[str, str]:
        """What a recording's header keeps (JSON keys are strings)."""
        return {str(v): n for v, n in sorted(self.names.items())}

    @classmethod
    def from_header(cls, head: dict) -> "ResetReasons":
        """The table a recording holds; one made before recordings kept it: this kernel's."""
        table = head.get("rst_reasons")
        if isinstance(table, dict) and table:
            try:
                return cls({int(k): str(v) for k, v in table.items()}, "recording")
            except (TypeError, ValueError):
                pass
        return kernel_reset_reasons()


_kernel: ResetReasons | None = None


def kernel_reset_reasons() -> ResetReasons:
    """This kernel's table, from its BTF (read once); FALLBACK_RST_REASONS without the enum."""
    global _kernel
    if _kernel is None:
        from tcplife_trace.probes import btf
        names, notes = btf.rst_reason_names()
        _kernel = ResetReasons(names, "btf") if names else ResetReasons(FALLBACK_RST_REASONS, "fallback", notes)
    return _kernel
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


def rst_reason_name(reason: int, reasons: ResetReasons | None = None) -> str:
    return (reasons or kernel_reset_reasons()).name(reason)


def _timer(f: Ends):
    """An error other than the ones an RST or an abort sets."""
    return (f.errno > 0) & (f.errno != ECONNRESET) & (f.errno != EPIPE) & (f.errno != ECONNREFUSED)


# (end_reason, detail(before, rst_reason, reasons) or None, errno shown, test(f, reasons)); the first
# that holds wins
RULES = (
    ("open", None, True, lambda f, rs: f.open),  # (a listener still open is open, not closed)
    ("listener_closed", None, True, lambda f, rs: f.listener),
    ("unknown", None, True, lambda f, rs: f.before == 0),
    ("refused", lambda b, r, rs: "ECONNREFUSED", True,
     lambda f, rs: (f.rr | (f.errno == ECONNREFUSED)) & (f.before == S.SYN_SENT)),
    ("reset_by_peer", lambda b, r, rs: f"RST received in {_state(b)}", True,
     lambda f, rs: f.rr | (f.errno == ECONNREFUSED)),
    ("timeout", lambda b, r, rs: "connect timeout (SYN retries exhausted)", True,
     lambda f, rs: (f.errno == ETIMEDOUT) & (f.before == S.SYN_SENT)),
    # a timer that gave up reports the last ICMP error it had instead of ETIMEDOUT, and an
    # ICMP error in SYN_SENT ends the connect at once (EHOSTUNREACH, ENETUNREACH, ...)
    ("timeout", lambda b, r, rs: "connect failed: destination unreachable (an ICMP error; errno says which)", True,
     lambda f, rs: _timer(f) & (f.before == S.SYN_SENT)),
    ("timeout", lambda b, r, rs: "keepalive probes unanswered", True,
     lambda f, rs: _timer(f) & (f.rst_reason == rs.keepalive)),
    ("timeout", lambda b, r, rs: f"retransmissions unanswered in {_state(b)}", True, lambda f, rs: _timer(f)),
    # before ECONNRESET: an abort (tcp_disconnect) reports ECONNRESET to itself
    ("local_abort", lambda b, r, rs: f"RST sent ({rs.name(r)}) in {_state(b)}", False,
     lambda f, rs: f.rst_sent),
    ("reset_by_peer", lambda b, r, rs: f"RST received in {_state(b)}", True,
     lambda f, rs: (f.errno == ECONNRESET) | (f.errno == EPIPE)),
    ("passive_close", None, True, lambda f, rs: f.before == S.LAST_ACK),
    ("active_close", lambda b, r, rs: "TIME_WAIT (not traced: the kernel swaps in a timewait socket)", True,
     lambda f, rs: time_wait_from(f.before)),
    # a blocking connect() with SO_SNDTIMEO, poll()/select() with a timeout, a language's own
    # connect timeout: the application gave up waiting for the SYN-ACK and closed
    ("timeout", lambda b, r, rs: CONNECT_ABANDONED, True, lambda f, rs: f.before == S.SYN_SENT),
    ("local_abort", lambda b, r, rs: "closed during handshake", False, lambda f, rs: f.before == S.SYN_RECV),
    ("unknown", lambda b, r, rs: f"{_state(b)} -> CLOSE with no reset or error seen", True, lambda f, rs: True),
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


def reported_errno(f: Ends, reasons: ResetReasons | None = None):
    """f.errno, with a report that said 0 replaced by the error the kernel set (see above)."""
    keepalive = (reasons or kernel_reset_reasons()).keepalive
    known = _pick([(f.rr & (f.before == S.SYN_SENT), ECONNREFUSED), (f.rr & (f.before == S.CLOSE_WAIT), EPIPE),
                   (f.rr, ECONNRESET), (f.rst_sent & (f.rst_reason == keepalive), ETIMEDOUT),
                   (f.rst_sent, ECONNRESET)], ETIMEDOUT)
    return _pick([(f.errno == 0, known)], f.errno)


def classify(f: Ends, reasons: ResetReasons | None = None) -> tuple[str, str | None, int | None]:
    """(end_reason, end_detail, the errno shown or None) of one connection; reset reasons
    named by `reasons` (default: this kernel's)."""
    rs = reasons or kernel_reset_reasons()
    cache = rs._cache
    hit = cache.get(f)
    if hit is None:
        key = f
        f = f._replace(errno=reported_errno(f, rs))
        for reason, detail, shown, test in RULES:
            if test(f, rs):
                hit = (reason, detail(f.before, f.rst_reason, rs) if detail else None,
                       f.errno if shown and f.errno > 0 else None)
                break
        if len(cache) > 4096:
            cache.clear()
        cache[key] = hit
    return hit


def classify_columns(f: Ends, reasons: ResetReasons | None = None) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The same for whole columns (numpy arrays, one row per connection): (rule index per
    row, detail code per row (-1: none), the detail names, the errno shown (-1: none))."""
    rs = reasons or kernel_reset_reasons()
    f = f._replace(errno=np.asarray(reported_errno(f, rs)))
    rule = np.select([np.asarray(test(f, rs), dtype=bool) for *_, test in RULES[:-1]],
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
            text = detail(b, rr - 1, rs)
            codes[i] = code_of.setdefault(text, len(names))
            if codes[i] == len(names):
                names.append(text)
    shown = np.array([s for _, _, s, _ in RULES], dtype=bool)[rule] & (f.errno > 0)
    return rule, codes[inverse.reshape(-1)], names, np.where(shown, f.errno, -1)


REASON_OF_RULE = [r for r, *_ in RULES]
