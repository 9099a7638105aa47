"""One look at every TCP socket on the host: sock_diag in each namespace, owners, counters."""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

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
    errors: list[str] = field(default_factory=list)      # what could not be read, one line each
    took_s: float = 0.0
    states: int = sock_diag.ALL_STATES              # the states asked for (a bit per state)
    # netns -> CLOCK_MONOTONIC ns when its dump ended: the kernel's clocks in tcp_info and the
    # timers were read up to then, later than taken_ns (probes/socket_age.age corrects for it)
    dumped_ns: dict[int, int] = field(default_factory=dict)


def _gone(ns: netns.Netns) -> bool:
    """The namespace went away while we looked: its path no longer leads to it (the process
    exited, `ip netns del`). Anything else that fails is an error to report."""
    try:
        return os.stat(ns.path).st_ino != ns.inode
    except OSError:
        return True


def _where(ns: netns.Netns) -> str:
    return f"network namespace {ns.name} (inode {ns.inode})"


def take(states: int = sock_diag.ALL_STATES, *, info: bool = True, owners: bool = True) -> Snapshot:
    """Every namespace is read; one that could not be (setns refused, sock_diag or /proc/net
    failed) is named in `errors` with why, never skipped silently. Only a namespace that
    vanished while we looked is left out without a word."""
    t0 = time.monotonic()
    taken = time.monotonic_ns()
    sockets: list[sock_diag.Sock] = []
    mibs, sysctls, names, errors, sockstat, dumped = {}, {}, {}, [], {}, {}
    for ns in netns.list_all(errors):
        step = "setns"
        try:
            with netns.entered(ns):
                step = "sock_diag"
                found = sock_diag.dump_here(ns.inode, states, info)
                dumped[ns.inode] = time.monotonic_ns()
                step = "its counters (/proc/net)"
                counters = kernel_counters.mibs_here()
                ctl = kernel_counters.sysctls_here()
                stat = kernel_counters.sockstat_here()
        except (OSError, NetlinkError) as e:
            if not _gone(ns):
                code = getattr(e, "errno", None) or getattr(e, "code", None)
                fix = " (needs CAP_SYS_ADMIN: run as root)" if step == "setns" and code == errno.EPERM else ""
                errors.append(f"{_where(ns)}: {step} failed: {getattr(e, 'strerror', None) or e}{fix}")
            continue
        sockets += found
        mibs[ns.inode], sysctls[ns.inode], sockstat[ns.inode] = counters, ctl, stat
        names[ns.inode] = ns.name
    holders = {}
    if owners:
        wanted = {s.inode for s in sockets if s.inode}
        unreadable: list[int] = []
        holders = proc_owners.holders(wanted, unreadable) if wanted else {}
        if unreadable:
            errors.append(f"owners: the descriptors (/proc/PID/fd) of {netns._some(unreadable)} could not be "
                          "read (permission denied): the sockets only they hold show no owner")
    return Snapshot(taken, sockets, holders, mibs, sysctls, names, complete=states == sock_diag.ALL_STATES,
                    sockstat=sockstat, errors=errors, took_s=time.monotonic() - t0, states=states,
                    dumped_ns=dumped)


# What a snapshot's sockets frame carries after the detectors' columns (analysis.evidence.SOCKET_COLUMNS):
# each socket's health from tcp_info (probes/health.py; NA for sockets without tcp_info: listeners,
# request sockets, TIME_WAIT) and its home, from the cgroup id sock_diag gives (the cgroup of the
# task that made the socket; tcplife_trace/containers.py).
HOME_COLUMNS = ("cgroup_id", "cgroup", "container_id", "pod_uid")
EXTRA_COLUMNS = (*sock_diag.HEALTH_COLUMNS, *HOME_COLUMNS)
FLOAT_COLUMNS = tuple(c for c in sock_diag.HEALTH_COLUMNS if c.endswith("_ms"))


def extra_columns(sockets: list[sock_diag.Sock], resolver=None):
    """EXTRA_COLUMNS of these sockets, one row each in their order (a pandas DataFrame).
    resolver: a containers.Resolver (its cache is kept between looks); None: home columns NA."""
    import pandas as pd
    health = [s.health or {} for s in sockets]
    data = {}
    for c in sock_diag.HEALTH_COLUMNS:
        values = [h.get(c) for h in health]
        data[c] = (pd.array(values, dtype="float64") if c in FLOAT_COLUMNS else pd.array(values, dtype="Int64"))
    homes = [resolver.by_id(s.cgroup_id) if resolver is not None and s.cgroup_id else None for s in sockets]
    data["cgroup_id"] = pd.array([s.cgroup_id for s in sockets], dtype="UInt64")
    for c, attr in (("cgroup", "path"), ("container_id", "container_id"), ("pod_uid", "pod_uid")):
        data[c] = pd.Series([getattr(h, attr) if h is not None else None for h in homes], dtype=object)
    return pd.DataFrame(data)
