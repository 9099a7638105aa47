"""The look at every TCP socket: dump_here (the raw netlink parse) against dump_here_reference
(pyroute2's), side by side on the same namespace full of TIME_WAIT sockets.

    .venv/bin/python bench/sock_look.py [--sockets 100000] [--rounds 3]

A fresh network namespace gets --sockets TIME_WAIT sockets from a bounded loopback loop
(clients that close first, against 8 listeners; tcp_tw_reuse off, the port range widened,
tcp_max_tw_buckets raised if it is lower), then each round takes both dumps of every state
with tcp_info, back to back, in alternating order. Both must return as many sockets. The
table gives medians over the rounds and the ratio reference / fast. The TIME_WAIT sockets
last 60 s: every step is bounded so that the rounds end before they expire.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

from pyroute2 import NetNS, netns

from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import sock_diag

NAME = f"tltlook{os.getpid()}"
LISTENERS = 8
MAKE_SECONDS = 40          # TIME_WAIT lasts 60 s: the making must leave time for the rounds


def _sysctl(key: str, value: str | None = None) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    if value is not None:
        with open(path, "w") as f:
            f.write(value)
    with open(path) as f:
        return f.read().strip()


def _time_wait() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    raise RuntimeError("/proc/net/sockstat has no TCP line")


def make_time_wait(count: int) -> tuple[int, float]:
    """count connections that each leave a TIME_WAIT socket in this thread's namespace, within
    MAKE_SECONDS; (connections made, seconds)."""
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(LISTENERS)]
    ports = [ls.getsockname()[1] for ls in listeners]
    t0 = time.monotonic()
    made = 0
    try:
        while made < count and time.monotonic() - t0 < MAKE_SECONDS:
            i = made % LISTENERS
            c = socket.create_connection(("127.0.0.1", ports[i]))
            s, _ = listeners[i].accept()
            c.close()               # the client closes first: its side ends in TIME_WAIT
            s.close()
            made += 1
    finally:
        for ls in listeners:
            ls.close()
    return made, time.monotonic() - t0


def one_round(ino: int, order: tuple[str, ...]) -> dict[str, tuple[float, int]]:
    dumps = {"fast": sock_diag.dump_here, "reference": sock_diag.dump_here_reference}
    out = {}
    for name in order:
        t0 = time.perf_counter()
        found = dumps[name](ino)
        out[name] = (time.perf_counter() - t0, len(found))
        del found
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=100_000, help="TIME_WAIT sockets to make (default 100000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both dumps (default 3)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("sock_look: needs root (a network namespace of its own)", file=sys.stderr)
        return 2
    if NAME in netns.listnetns():
        netns.remove(NAME)
    netns.create(NAME)
    try:
        with NetNS(NAME) as ip:
            ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        ns = netns_mod.Netns(os.stat(f"/run/netns/{NAME}").st_ino, f"/run/netns/{NAME}", NAME)
        with netns_mod.entered(ns):
            _sysctl("net.ipv4.tcp_tw_reuse", "0")
            _sysctl("net.ipv4.ip_local_port_range", "10000 65000")
            if int(_sysctl("net.ipv4.tcp_max_tw_buckets")) < args.sockets + 1000:
                _sysctl("net.ipv4.tcp_max_tw_buckets", str(args.sockets + 1000))
            made, took = make_time_wait(args.sockets)
            tw = _time_wait()
            print(f"sock_look: {made} connections in {took:.1f} s, {tw} TIME_WAIT sockets in netns {NAME} "
                  f"(tcp_max_tw_buckets {_sysctl('net.ipv4.tcp_max_tw_buckets')})")
            results = []
            deadline = time.monotonic() + 55 - took  # (the first TIME_WAIT sockets expire 60 s after they were made)
            for r in range(args.rounds):
                if time.monotonic() > deadline:
                    print(f"sock_look: stopped after {r} rounds (the TIME_WAIT sockets expire)", file=sys.stderr)
                    break
                order = ("fast", "reference") if r % 2 == 0 else ("reference", "fast")
                res = one_round(ns.inode, order)
                if res["fast"][1] != res["reference"][1]:
                    print(f"sock_look: round {r + 1}: the dumps differ in size: fast {res['fast'][1]}, "
                          f"reference {res['reference'][1]}", file=sys.stderr)
                    return 1
                results.append(res)
            tw_after = _time_wait()
        if not results:
            return 1
        fast = statistics.median(r["fast"][0] for r in results)
        ref = statistics.median(r["reference"][0] for r in results)
        n = statistics.median(r["fast"][1] for r in results)
        print(f"sock_look: every state with tcp_info, {len(results)} rounds (medians), {n:.0f} sockets "
              f"(TIME_WAIT {tw} at the start, {tw_after} at the end), {os.cpu_count()} CPUs, kernel {os.uname().release}")
        print(f"{'dump':<28}{'s':>10}{'us/socket':>12}   rounds (s)")
        for label, name, median in (("dump_here (raw netlink)", "fast", fast), ("dump_here_reference", "reference", ref)):
            each = ", ".join(f"{r[name][0]:.3f}" for r in results)
            print(f"{label:<28}{median:>10.3f}{median / n * 1e6:>12.2f}   {each}")
        print(f"ratio reference / fast: {ref / fast:.1f}")
        return 0
    finally:
        netns.remove(NAME)


if __name__ == "__main__":
    sys.exit(main())
