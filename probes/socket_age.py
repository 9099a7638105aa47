"""How long a socket has been in its state, from what sock_diag returns: the one home of that rule.

For a socket the trace did not see enter its state, the kernel still keeps clocks that
start at or after the state began. The time since such an event is a true LOWER bound of
the time in the state (it can only be later than the entry); which clock qualifies
depends on the state, checked against the kernel's rules (net/ipv4/tcp_input.c,
tcp_output.c, tcp_minisocks.c, tcp_timer.c, inet_connection_sock.c; Linux 6.x):

- tcp_info's last_ack_recv is tp->rcv_tstamp, set by tcp_ack() for every ACK at or
  beyond snd_una. CLOSE_WAIT and CLOSING begin on the peer's FIN, FIN_WAIT2 on the ACK of
  our FIN: each of those segments goes through tcp_ack() first, so rcv_tstamp is at or
  after the entry. (A reordered FIN whose ACK is older than one already seen would not
  move it: then the bound is early by that reordering delay.)
- last_data_recv (icsk_ack.lrcvtime) moves only when a segment carries data, last_data_sent
  (lsndtime) only when we send one: a FIN alone moves neither. So last_data_recv is
  older than the FIN in CLOSE_WAIT (an upper bound there, not a lower one), and
  last_data_sent says nothing about FIN_WAIT1 or LAST_ACK. For ESTABLISHED all three are
  set when the state begins (tcp_finish_connect, tcp_create_openreq_child, the SYN_RECV
  branch of tcp_rcv_state_process) and only move forward, so the largest is the bound.
- FIN_WAIT1 and LAST_ACK begin when we queue our FIN and no ACK need ever come (the piles
  are exactly that). When only the FIN is outstanding (write_seq - snd_una == 1, the
  diag's wqueue) and it has been retransmitted k >= 1 times, the retransmission series
  began at or after the entry (the FIN's first transmission, or a later ACK of the data
  before it, re-armed the timer) and each RTO at most doubled the one before: the time
  since the series began is at least rto*(2 - 2**-k) - expires. With k == 0 the timer may
  be a tail-loss probe, not an RTO: no bound.
- SYN_SENT: the SYN leaves when the state begins; the RTO does not grow for the first
  tcp_syn_linear_timeouts retransmissions, then doubles (capped). Summing the intervals
  back from the current rto gives the time since the first SYN, exactly unless the cap
  was hit (then less: still a lower bound).
- SYN_RECV request sockets (no tcp_info): the timer starts at TCP_TIMEOUT_INIT (1 s) and
  doubles at each of its expiries; a duplicate SYN re-sends the SYN-ACK (retrans counts it)
  and only postpones the timer. The smallest number of expiries consistent with the time
  left gives the bound.
- Minisockets: TIME_WAIT's timer is armed for 60 s on entry and re-armed by a
  retransmitted FIN, so 60 - expires is a lower bound (usually the exact age). An orphan's
  FIN_WAIT2 minisocket is armed for tcp_fin_timeout (minus 60 s when that is longer than
  60 s): the bound assumes no TCP_LINGER2 below the sysctl.
- LISTEN and full SYN_RECV sockets (TCP Fast Open, simultaneous open): no bound.

All these clocks count jiffies, so every bound gives up one tick of the coarsest kernel
clock (HZ=100: 10 ms). The retransmission bounds take the timer as armed for the full RTO:
an application's TCP_USER_TIMEOUT that clamps it would make them too long (not seen here).
"""
from __future__ import annotations

from .tcp_states import TcpState as S

JIFFY_S = 0.010
TIME_WAIT_S = 60.0        # TCP_TIMEWAIT_LEN: fixed in Linux
SYN_TIMEOUT_INIT_S = 1.0  # TCP_TIMEOUT_INIT: the first SYN and SYN-ACK timeout
RTO_MAX_S = 120.0         # TCP_RTO_MAX

# where an age came from (the sockets frame's age_source column)
TRACE = "trace"                       # the trace saw the state begin: exact
SEEN = "first snapshot"               # seen in that state since the first snapshot
ACK_RECV = "tcp_info last_ack_recv"
LAST_EVENT = "tcp_info last ack/data"  # ESTABLISHED: the latest of the three clocks
SYN_RETRANS = "SYN retransmits"
FIN_RETRANS = "FIN retransmits"
REQ_TIMER = "SYN-ACK timer"
TIME_WAIT_TIMER = "timewait timer"
FIN_WAIT2_TIMER = "fin_wait2 timer"


def _ms(v) -> float | None:
    return None if v is None else v / 1000


def _backoff_sum(rto_now: float, k: int, linear: int, cap: float) -> float:
    """Sum of the k RTO intervals before the current one, walking back from rto_now: after
    retransmission i (1-based) the kernel doubles the RTO only if i > linear."""
    total, rto = 0.0, rto_now
    for i in range(k, 0, -1):   # the interval armed after transmission i-1
        if i > linear:
            rto = rto / 2
        total += min(rto, cap)
    return total


def kernel_bound(s, sysctls: dict | None = None) -> tuple[float | None, str | None]:
    """(seconds, source): a lower bound of the time socket s (a probes.sock_diag.Sock) has been
    in its state, from the kernel's own clocks; (None, None) when they bound nothing."""
    ctl = sysctls or {}
    st, expires = s.state, s.expires_ms / 1000
    bound = source = None
    if s.timer == "timewait":
        if st == S.TIME_WAIT:
            bound, source = TIME_WAIT_S - expires, TIME_WAIT_TIMER
        else:  # an orphan's FIN_WAIT2
            fin = float(ctl.get("tcp_fin_timeout", 60))
            bound, source = (fin if fin <= TIME_WAIT_S else fin - TIME_WAIT_S) - expires, FIN_WAIT2_TIMER
    elif st == S.SYN_RECV and not s.inode and s.timer == "on":
        cap = min(ctl.get("tcp_rto_max_ms", RTO_MAX_S * 1000) / 1000, RTO_MAX_S)
        n = 0
        while min(SYN_TIMEOUT_INIT_S * 2 ** n, cap) < expires and n < s.retrans:
            n += 1
        bound = sum(min(SYN_TIMEOUT_INIT_S * 2 ** j, cap) for j in range(n)) \
            + min(SYN_TIMEOUT_INIT_S * 2 ** n, cap) - expires
        source = REQ_TIMER
    elif st == S.SYN_SENT and s.timer == "on" and s.rto_ms:
        rto = s.rto_ms / 1000
        cap = ctl.get("tcp_rto_max_ms", RTO_MAX_S * 1000) / 1000
        bound = _backoff_sum(rto, s.retrans, int(ctl.get("tcp_syn_linear_timeouts", 0)), cap) + rto - expires
        source = SYN_RETRANS
    elif st in (S.FIN_WAIT1, S.LAST_ACK) and s.timer == "on" and s.retrans >= 1 and s.wqueue == 1 and s.rto_ms:
        rto = s.rto_ms / 1000
        bound = _backoff_sum(rto, s.retrans, 0, RTO_MAX_S) + rto - expires
        source = FIN_RETRANS
    elif st in (S.CLOSE_WAIT, S.FIN_WAIT2, S.CLOSING) and s.ack_recv_ms is not None:
        bound, source = _ms(s.ack_recv_ms), ACK_RECV
    elif st == S.ESTABLISHED and s.ack_recv_ms is not None:
        clocks = [_ms(v) for v in (s.ack_recv_ms, s.idle_recv_ms, s.idle_sent_ms) if v is not None]
        bound, source = max(clocks), LAST_EVENT
    if bound is None:
        return None, None
    return max(bound - JIFFY_S, 0.0), source


def age(s, sysctls: dict | None, seen_s: float, late_s: float = 0.0) -> tuple[float, str]:
    """(seconds, source) for a socket the trace did not see enter its state: the larger of the
    kernel's bound and the time it has been seen in that state (both lower bounds), as of the
    snapshot's time. late_s: how much later than that the kernel may have read its clocks (the
    namespace's dump ended then), taken off the kernel's bound."""
    bound, source = kernel_bound(s, sysctls)
    if bound is not None:
        bound = max(bound - max(late_s, 0.0), 0.0)
    if bound is None or bound < seen_s:
        return max(seen_s, 0.0), SEEN
    return bound, source
