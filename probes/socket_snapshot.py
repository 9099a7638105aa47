"""One look at every TCP socket on the host: sock_diag in each namespace, owners, counters."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import kernel_counters, netns, proc_owners, sock_diag


@dataclass
class Snapshot:
    taken_ns: int                                   # CLOCK_MONOTONIC, as the trace's timestamps
    sockets: list[sock_diag.Sock]
    holders: dict[int, list[proc_owners.Holder]]    # inode -> processes with it open
    mibs: dict[int, dict[str, int]]                 # netns inode -> TcpExt counters
    sysctls: dict[int, dict[str, object]]
    netns_names: dict[int, str]
    complete: bool                                  # all states (else the periodic subset)
    sockstat: dict[int, dict[str, int]] = field(default_factory=dict)  # netns -> /proc/net/sockstat TCP
    errors: list[str] = field(default_factory=list)
    took_s: float = 0.0


def take(states: int = sock_diag.ALL_STATES, *, info: bool = True, owners: bool = True) -> Snapshot:
    t0 = time.monotonic()
    taken = time.monotonic_ns()
    sockets: list[sock_diag.Sock] = []
    mibs, sysctls, names, errors, sockstat = {}, {}, {}, [], {}
    for ns in netns.list_all():
        try:
            with netns.entered(ns):
                sockets += sock_diag.dump_here(ns.inode, states, info)
                mibs[ns.inode] = kernel_counters.mibs_here()
                sysctls[ns.inode] = kernel_counters.sysctls_here()
                sockstat[ns.inode] = kernel_counters.sockstat_here()
            names[ns.inode] = ns.name
        except OSError as e:  # the namespace went away while we looked: not an error
            if ns.name == "host":
                errors.append(f"sock_diag in our own network namespace failed: {e}")
    holders = {}
    if owners:
        wanted = {s.inode for s in sockets if s.inode}
        holders = proc_owners.holders(wanted) if wanted else {}
    return Snapshot(taken, sockets, holders, mibs, sysctls, names, complete=states == sock_diag.ALL_STATES,
                    sockstat=sockstat, errors=errors, took_s=time.monotonic() - t0)
