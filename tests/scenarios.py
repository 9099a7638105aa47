"""Roles for the incident scenario tests, run inside a test namespace (`ip netns exec`).

Each role prints "ready" once its sockets are in place, then holds them until
killed (or exits when it has nothing to hold). Every loop is bounded in count.

  serve PORT [--backlog N] [--no-close | --close-on-stdin]
                                          accept; on EOF close (never; or when a line comes on stdin)
  connect HOST PORT N [--then close|shutdown|hold] [--wait-stdin]
  connect-nb HOST PORT N                  non-blocking connects left pending
  refused HOST PORT N                     connects expected to be refused
  churn HOST PORT N                       connect, send, close first (TIME_WAIT here)
  synflood HOST PORT N                    raw SYNs from spoofed 10.78.0.100+i sources
"""
import argparse
import errno
import random
import selectors
import socket
import struct
import sys
import time

HOLD_S = 120  # upper bound on how long any role lingers if never killed


def ready():
    print("ready", flush=True)


def hold():
    time.sleep(HOLD_S)


def serve(a):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a.port))
    srv.listen(a.backlog)
    if a.no_accept:
        ready()
        hold()
        return
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    kept = []
    if a.close_on_stdin:
        sel.register(sys.stdin, selectors.EVENT_READ)
    ready()
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            if key.fileobj is sys.stdin:
                sys.stdin.readline()
                for s in kept:
                    s.close()
                kept.clear()
                print("closed", flush=True)
                continue
            if key.fileobj is srv:
                conn, _ = srv.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            data = key.fileobj.recv(4096)
            if not data:  # EOF: the peer closed
                sel.unregister(key.fileobj)
                if a.no_close or a.close_on_stdin:
                    kept.append(key.fileobj)
                else:
                    key.fileobj.close()


def connect(a):
    socks = []
    for _ in range(a.n):
        s = socket.create_connection((a.host, a.port), timeout=5)
        s.sendall(b"hello")
        socks.append(s)
    ready()
    if a.wait_stdin:
        sys.stdin.readline()
    for s in socks:
        if a.then == "close":
            s.close()
        elif a.then == "shutdown":
            s.shutdown(socket.SHUT_WR)
    print("done", flush=True)
    hold()


def connect_nb(a):
    socks = []
    for _ in range(a.n):
        s = socket.socket()
        s.setblocking(False)
        rc = s.connect_ex((a.host, a.port))
        assert rc in (errno.EINPROGRESS, 0), rc
        socks.append(s)
    ready()
    hold()


def refused(a):
    n = 0
    for _ in range(a.n):
        try:
            socket.create_connection((a.host, a.port), timeout=5).close()
        except ConnectionRefusedError:
            n += 1
    print(n, flush=True)


def churn(a):
    for _ in range(a.n):
        s = socket.create_connection((a.host, a.port), timeout=5)
        s.sendall(b"x")
        s.close()
    ready()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def synflood(a):
    """SYNs with spoofed sources: their SYN-ACKs go nowhere, the handshakes stay half-open."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    dst = socket.inet_aton(a.host)
    for i in range(a.n):
        src = socket.inet_aton(f"10.78.0.{100 + i % 100}")
        sport = 20000 + i
        seq = random.getrandbits(32)
        tcp = struct.pack("!HHIIBBHHH", sport, a.port, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64,
                         socket.IPPROTO_TCP, 0, src, dst)
        raw.sendto(ip + tcp, (a.host, 0))
    ready()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--backlog", type=int, default=128)
    s.add_argument("--no-close", action="store_true")
    s.add_argument("--no-accept", action="store_true")
    s.add_argument("--close-on-stdin", action="store_true")
    for name in ("connect", "connect-nb", "refused", "churn", "synflood"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("n", type=int)
        if name == "connect":
            c.add_argument("--then", choices=["close", "shutdown", "hold"], default="close")
            c.add_argument("--wait-stdin", action="store_true")
    a = p.parse_args()
    assert a.role == "serve" or a.n <= 1000, "bounded"
    {"serve": serve, "connect": connect, "connect-nb": connect_nb, "refused": refused,
     "churn": churn, "synflood": synflood}[a.role](a)


if __name__ == "__main__":
    main()
