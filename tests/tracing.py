"""Helpers for privileged tests: a live session that collects, and peer processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from tcplife_trace.live import LiveSession
from tcplife_trace.probes.tcp_states import TcpState as S

PEERS = os.path.join(os.path.dirname(__file__), "peers.py")


class Traced:
    def __init__(self, settings=None, **kw):
        self.closed = []
        self.transitions = []
        self.session = LiveSession(settings, on_close=self.closed.append,
                                   on_transition=self.transitions.append, **kw)

    def wait_for(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.session.poll(50)
            if predicate():
                return True
        return False

    def by_port(self, port):
        return [lc for lc in self.closed if port in (lc.lport, lc.rport)]

    def wait_closed(self, port, n, timeout=10.0):
        assert self.wait_for(lambda: len(self.by_port(port)) >= n, timeout), \
            f"expected {n} finished connections on port {port}, got {len(self.by_port(port))}"
        return self.by_port(port)

    def steps(self, lc):
        return [(S(t.oldstate).name, S(t.newstate).name) for t in self.transitions
                if t.lc is lc]

    def stop(self):
        return self.session.stop()


class Server:
    def __init__(self, family="4", mode="normal"):
        self.proc = subprocess.Popen([sys.executable, PEERS, "server", family, mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "READY", line
        self.port, self.pid, self.worker_pid = int(line[1]), int(line[2]), int(line[3])

    def readline(self):
        return self.proc.stdout.readline().strip()

    def send(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self):
        return self.proc.wait(timeout=15)


def client(family, port, mode="normal"):
    """Run a client process to completion; returns (pid, its output lines)."""
    proc = subprocess.Popen([sys.executable, PEERS, "client", family, str(port), mode],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=15)
    return proc.pid, out.split("\n")
