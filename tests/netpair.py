"""Two network namespaces joined by a veth pair, built with pyroute2, for scenario tests.

    a (10.78.0.1/24) <-veth-> b (10.78.0.2/24)

All test traffic stays between them. `blackhole(ns, addr)` pins a bogus neighbour
entry so that packets to addr leave but nobody receives them (this kernel has no
netem or iptables).
"""
from __future__ import annotations

import os
import subprocess
import sys

from pyroute2 import IPRoute, NetNS, netns

A_ADDR, B_ADDR = "10.78.0.1", "10.78.0.2"
GHOST = "10.78.0.3"  # on the link, never answers
BOGUS_MAC = "02:00:00:de:ad:01"
SCENARIOS = os.path.join(os.path.dirname(__file__), "scenarios.py")


class NetPair:
    def __init__(self, tag: str):
        self.a, self.b = f"tlt{tag}a", f"tlt{tag}b"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> NetPair:
        self.down()
        for name in (self.a, self.b):
            netns.create(name)
        with IPRoute() as ip:
            ip.link("add", ifname=f"{self.a}0", kind="veth", peer=f"{self.b}0")
            for ns, ifname in ((self.a, f"{self.a}0"), (self.b, f"{self.b}0")):
                idx = ip.link_lookup(ifname=ifname)[0]
                ip.link("set", index=idx, net_ns_fd=ns)
        for ns, addr in ((self.a, A_ADDR), (self.b, B_ADDR)):
            with NetNS(ns) as ip:
                idx = ip.link_lookup(ifname=f"{ns}0")[0]
                ip.addr("add", index=idx, address=addr, prefixlen=24)
                ip.link("set", index=idx, state="up")
                ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        return self

    def blackhole(self, ns: str, addr: str) -> None:
        with NetNS(ns) as ip:
            idx = ip.link_lookup(ifname=f"{ns}0")[0]
            ip.neigh("replace", dst=addr, lladdr=BOGUS_MAC, ifindex=idx, state="permanent")

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set a per-namespace sysctl inside ns only."""
        from tcplife_trace.probes import netns as netns_mod
        target = netns_mod.Netns(self.inode(ns), f"/run/netns/{ns}", ns)
        with netns_mod.entered(target), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)

    def start(self, ns: str, *args: str, ready: bool = True) -> subprocess.Popen:
        """Run a scenario role in ns; waits for its 'ready' line."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, SCENARIOS, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        if ready:
            line = p.stdout.readline().strip()
            assert line == "ready", f"scenario {args} did not start: {line!r}"
        return p

    @staticmethod
    def tell(p: subprocess.Popen, expect: str = "done") -> None:
        """Let a role that waits on stdin go on; wait for its next line."""
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline().strip()
        assert line == expect, line

    def inode(self, ns: str) -> int:
        return os.stat(f"/run/netns/{ns}").st_ino

    def run(self, ns: str, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, SCENARIOS, *args],
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def down(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()
        for name in (self.a, self.b):
            if name in netns.listnetns():
                netns.remove(name)

    def __exit__(self, *exc) -> None:
        self.down()
