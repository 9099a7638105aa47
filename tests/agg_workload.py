"""A mixed TCP workload on loopback, for the kernel-aggregation tests.

    agg_workload.py ROUNDS WORKERS [PORTS_FILE]
    agg_workload.py hold N

WORKERS processes, each with its own IPv4 and IPv6 listener, each run ROUNDS of: client closes first,
server closes first, a refused connect, an abort (SO_LINGER 0) from either side, a
half-close with data both ways, an accepted socket read by a forked child (another
owner), and a short burst of plain connects. Prints "DONE" (or "FAILED"). With PORTS_FILE,
writes there the endpoints every connection of its own has at one end, one "ADDR PORT" a
line: each worker's two listeners and the port its refused connects go to (a test tells
its workload's connections from other processes' on the same host by them).
`hold N`: N connections to one listener held open at once (more than a small kernel
connection map holds), then closed, the clients first for even ones, the server first for
odd ones: the last third born first (the map still full: no entry to their end), then the
first third (which had the entries), then the middle third (born without an entry, they get
one as they close); prints the listener's port, then "DONE".
Every socket has a timeout and every loop a fixed count.
"""
import os
import socket
import struct
import sys
import time

TIMEOUT = 10


def pair(ls, family, host):
    c = socket.socket(family)
    c.settimeout(TIMEOUT)
    c.connect((host, ls.getsockname()[1]))
    a, _ = ls.accept()
    a.settimeout(TIMEOUT)
    return c, a


def linger0(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def one_round(ls, family, host, closed_port):
    c, a = pair(ls, family, host)           # client closes first
    c.sendall(b"x" * 100)
    a.recv(100)
    c.close()
    a.recv(10)
    a.close()
    c, a = pair(ls, family, host)           # server closes first
    a.sendall(b"y" * 50)
    a.close()
    c.recv(100)
    c.recv(100)
    c.close()
    r = socket.socket(family)               # refused
    r.settimeout(TIMEOUT)
    try:
        r.connect((host, closed_port))
    except OSError:
        pass
    r.close()
    c, a = pair(ls, family, host)           # client aborts
    linger0(c)
    try:
        a.recv(10)
    except OSError:
        pass
    a.close()
    c, a = pair(ls, family, host)           # server aborts with data unread
    c.sendall(b"z")
    linger0(a)
    try:
        c.recv(10)
    except OSError:
        pass
    c.close()
    c, a = pair(ls, family, host)           # half-close, data both ways
    c.sendall(b"q" * 1000)
    c.shutdown(socket.SHUT_WR)
    while a.recv(4096):
        pass
    a.sendall(b"r" * 2000)
    a.close()
    while c.recv(4096):
        pass
    c.close()
    c, a = pair(ls, family, host)           # a forked child reads and closes the accepted socket
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            c.close()  # the parent's client end: held here it would never send its FIN
            while a.recv(100):
                pass
            a.close()
            code = 0
        finally:
            os._exit(code)
    a.close()
    c.sendall(b"hello")
    c.close()
    os.waitpid(pid, 0)
    for _ in range(5):                      # plain connects, the server never reads
        c, a = pair(ls, family, host)
        c.close()
        a.close()


def listeners():
    l4 = socket.socket()
    l4.bind(("127.0.0.1", 0))
    l4.listen(64)
    l6 = socket.socket(socket.AF_INET6)
    l6.bind(("::1", 0))
    l6.listen(64)
    for ls in (l4, l6):
        ls.settimeout(TIMEOUT)
    return l4, l6


def hold(n):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(n)
    ls.settimeout(TIMEOUT)
    print(ls.getsockname()[1], flush=True)
    held = []
    for i in range(n):
        held.append(pair(ls, socket.AF_INET, "127.0.0.1"))
        if i % 50 == 49:
            time.sleep(0.005)  # the tracer's consumer shares 2 CPUs with this: no burst losses
    third = n // 3
    for k, i in enumerate([*range(2 * third, n), *range(third), *range(third, 2 * third)]):
        if k % 50 == 49:
            time.sleep(0.005)
        c, a = held[i]
        first, second = (c, a) if i % 2 == 0 else (a, c)
        first.close()
        second.recv(10)
        second.close()
    ls.close()
    print("DONE", flush=True)


def tell_ports(path, endpoints):
    """Append "ADDR PORT" lines to path (one write each: the workers append at once)."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, "".join(f"{a} {p}\n" for a, p in endpoints).encode())
        finally:
            os.close(fd)


def main():
    if sys.argv[1] == "hold":
        hold(int(sys.argv[2]))
        return
    rounds, workers = int(sys.argv[1]), int(sys.argv[2])
    ports_file = sys.argv[3] if len(sys.argv) > 3 else None
    probe = socket.socket()                 # a port nobody listens on
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    tell_ports(ports_file, [("127.0.0.1", closed_port), ("::1", closed_port)])
    kids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                l4, l6 = listeners()        # its own: a shared listener would hand out others' connections
                tell_ports(ports_file, [ls.getsockname()[:2] for ls in (l4, l6)])
                for i in range(rounds):
                    if (w + i) % 2:
                        one_round(l6, socket.AF_INET6, "::1", closed_port)
                    else:
                        one_round(l4, socket.AF_INET, "127.0.0.1", closed_port)
                l4.close()
                l6.close()
                code = 0
            except Exception as e:  # noqa: BLE001 - say what went wrong, then exit non-zero
                print(f"worker {w}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        kids.append(pid)
    ok = all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in kids)
    print("DONE" if ok else "FAILED", flush=True)


if __name__ == "__main__":
    main()
