"""What the kernel lost, by kind, from one look at its counters and at what we read.

Every event a program tries to send is counted once as emitted (ebpf/tcplife.bpf.c,
ev_send) and ends in exactly one of: received (read from the ring or the overflow
perf buffer), lost because both buffers refused it (counted per event kind, in the
kernel), or lost in user space as an unreadable ring record (`ring_discarded`,
never expected). A tracepoint hit that found a BPF program already running on its
CPU never runs our program at all: the kernel counts it in that program's
recursion_misses only. Each such hit is counted as one event emitted and lost
(kind `recursion:<tracepoint>`), an upper bound: the program might have sent
nothing for it (another protocol, a filtered connection). So, once the program is
detached and both buffers are read, received + lost == emitted, exactly.
"""
from __future__ import annotations

RECURSION = "recursion:"        # + tracepoint, e.g. recursion:sock:inet_sock_set_state
RING_DISCARDED = "ring_discarded"

CONSUMER_BEHIND = ("the consumer fell behind; a larger --ring-pages or a filter (-p/-L/-D) helps")
RECURSION_WHY = ("the kernel skipped our programs while another BPF program ran on the same CPU "
                 "(recursion misses: another tracer or profiler, or BPF map work, on this host)")
DISCARD_WHY = "ring records that could not be read"


def account(kernel: dict, received_by_kind: dict[str, int], ring_discarded: int) -> dict:
    """Totals and per-kind dicts (every kind, zeros included) from EventStream.kernel_counts()
    and what the stream read."""
    lost = dict(kernel["lost"])
    emitted = dict(kernel["emitted"])
    received = dict(received_by_kind)
    for tp, n in sorted((kernel.get("recursion") or {}).items()):
        lost[RECURSION + tp] = emitted[RECURSION + tp] = n
        received[RECURSION + tp] = 0
    lost[RING_DISCARDED] = ring_discarded  # emitted already counts them, under their kind
    return {"received": sum(received.values()), "emitted": sum(emitted.values()),
            "lost": sum(lost.values()), "received_by_kind": received,
            "emitted_by_kind": emitted, "lost_by_kind": lost}


def why(new_by_kind: dict[str, int]) -> str:
    """What to tell the user about losses that just happened (kind -> how many new)."""
    out = []
    if any(n for k, n in new_by_kind.items() if not k.startswith(RECURSION) and k != RING_DISCARDED):
        out.append(CONSUMER_BEHIND)
    rec = sum(n for k, n in new_by_kind.items() if k.startswith(RECURSION))
    if rec:
        out.append(f"{rec} of them {RECURSION_WHY}")
    if new_by_kind.get(RING_DISCARDED):
        out.append(f"{new_by_kind[RING_DISCARDED]} {DISCARD_WHY}")
    return "; ".join(out)


# The report fields --strict fails on: anything lost (events_lost holds the recursion misses and
# ring_discarded too), connections untracked, events out of place.
DEGRADED_BY = ("events_lost", "ring_discarded", "conn_map_full", "evictions", "overflow_out_of_order",
               "sequence_gaps")


def degraded_by(report: dict) -> list[str]:
    """Why a run's report does not hold every event in place ("events_lost 3", ...); empty if it does."""
    return [f"{k} {report[k]}" for k in DEGRADED_BY if report.get(k)]
