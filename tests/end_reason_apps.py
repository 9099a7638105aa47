"""The applications of the end-reason matrix (tests/test_end_reasons.py): each prints, for each
of its connections, what the application itself saw, as one JSON line.

    end_reason_apps.py server ADDR4 ADDR6 PORT
    end_reason_apps.py client FAMILY WAIT SERVER_ADDR CLOSED_PORT GHOST_ADDR

The server accepts on both addresses; the client's first byte tells it what to do with the
connection: A abort it (SO_LINGER 0), C close it first, E answer then wait for the client's
close, R read until the client aborts. The client runs every case at once (one thread each),
waiting the way WAIT says:
  block     a blocking socket: blocking connect(), recv(), send()
  poll      a non-blocking socket and poll()
  select    a non-blocking socket and select()
  sockopt   a blocking socket with SO_SNDTIMEO (connect) and SO_RCVTIMEO (recv)
"What it saw" is an errno name the call returned (ECONNREFUSED, ETIMEDOUT, ECONNRESET, EPIPE),
or: gave_up (its own wait ran out before connect() finished, then it closed), aborted (it
closed with SO_LINGER 0), closed_first (it closed before the peer), eof (the peer closed
first: recv() returned 0). Every wait is bounded.
"""
import errno
import json
import select
import socket
import struct
import sys
import threading
import time

LONG = 10.0        # longer than the kernel's connect timeout in the test namespace (3 s)
GIVE_UP = 0.5      # the application's own connect timeout


_out = threading.Lock()


def say(**kw):
    with _out:  # one line per report, whichever thread
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()


def linger0(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# -- server ---------------------------------------------------------------------------------
def serve_one(a, family, lport, rport):
    a.settimeout(LONG)
    saw = "?"
    try:
        cmd = a.recv(1)
        if cmd == b"A":
            linger0(a)
            saw = "aborted"
        elif cmd == b"C":
            a.close()
            saw = "closed_first"
        elif cmd == b"E":
            a.sendall(b"e")
            saw = "eof" if a.recv(10) == b"" else "data"
            a.close()
        elif cmd == b"R":
            while a.recv(10):
                pass
            saw = "eof"
            a.close()
    except OSError as e:
        saw = errno.errorcode.get(e.errno, str(e))
        a.close()
    say(side="server", family=family, lport=lport, rport=rport, saw=saw)


def server(addr4, addr6, port):
    listeners = []
    for family, addr in ((4, addr4), (6, addr6)):
        ls = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(64)
        listeners.append((ls, family))
    say(ready=True)
    handlers = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r, _, _ = select.select([ls for ls, _ in listeners], [], [], 1.0)
        for ls in r:
            a, peer = ls.accept()  # (its ports from here: a peer's abort may already have reset it)
            handlers.append(threading.Thread(target=serve_one, args=(a, dict(listeners)[ls], port, peer[1]),
                                             daemon=True))
            handlers[-1].start()
        if sys.stdin in select.select([sys.stdin], [], [], 0)[0]:
            break
    for h in handlers:  # every connection reports (each wait is bounded)
        h.join(timeout=LONG)


# -- client ---------------------------------------------------------------------------------
class Conn:
    def __init__(self, family, wait, dest):
        self.wait = wait
        self.s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
        self.s.bind(("0.0.0.0" if family == 4 else "::", 0))
        self.lport = self.s.getsockname()[1]
        self.dest = dest
        if wait in ("poll", "select"):
            self.s.setblocking(False)

    def _timeo(self, opt, seconds):
        self.s.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))

    def _ready(self, write, seconds):
        """Wait (poll or select) until the socket is writable/readable or has an error."""
        if self.wait == "poll":
            p = select.poll()
            p.register(self.s, (select.POLLOUT if write else select.POLLIN) | select.POLLERR | select.POLLHUP)
            return bool(p.poll(seconds * 1000))
        r, w, x = select.select([] if write else [self.s], [self.s] if write else [], [self.s], seconds)
        return bool(r or w or x)

    def connect(self, seconds):
        """None once connected, else what the application saw."""
        try:
            if self.wait == "block":
                self.s.connect(self.dest)
                return None
            if self.wait == "sockopt":
                self._timeo(socket.SO_SNDTIMEO, seconds)
                self.s.connect(self.dest)
                return None
            err = self.s.connect_ex(self.dest)
            if err == errno.EINPROGRESS:
                if not self._ready(True, seconds):
                    return "gave_up"
                err = self.s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return errno.errorcode[err] if err else None
        except OSError as e:
            if e.errno == errno.EINPROGRESS:  # SO_SNDTIMEO ran out: connect() did not finish
                return "gave_up"
            return errno.errorcode.get(e.errno, str(e))

    def recv(self):
        if self.wait in ("poll", "select"):
            self._ready(False, LONG)
        elif self.wait == "sockopt":
            self._timeo(socket.SO_RCVTIMEO, LONG)
        return self.s.recv(10)

    def send(self, data):
        if self.wait in ("poll", "select"):
            self._ready(True, LONG)
        self.s.send(data)


def case(name, family, wait, server_addr, closed_port, ghost):
    dest = {"refused": (server_addr, closed_port), "connect_timeout": (ghost, 80),
            "gave_up": (ghost, 80)}.get(name, (server_addr, PORT))
    c = Conn(family, wait, dest)
    out = dict(side="client", case=name, family=family, wait=wait, lport=c.lport, raddr=dest[0], rport=dest[1])
    try:
        saw = c.connect(GIVE_UP if name == "gave_up" else LONG)
        if saw is not None or name in ("refused", "connect_timeout", "gave_up"):
            c.s.close()
            return say(**out, saw=saw or "connected")
        if name == "peer_reset":
            c.send(b"A")
            saw = "data" if c.recv() else "eof"
        elif name == "epipe":
            c.send(b"C")
            assert c.recv() == b""
            c.send(b"x")                       # to the peer's closed socket: it answers with an RST
            if wait == "poll":
                p = select.poll()
                p.register(c.s, 0)             # POLLERR/POLLHUP only: the RST has come
                p.poll(LONG * 1000)
            elif wait == "select":
                select.select([], [], [c.s], 0.3)
            else:
                time.sleep(0.3)
            c.send(b"y")
            saw = "sent"
        elif name == "local_abort":
            c.send(b"R")
            time.sleep(0.05)
            linger0(c.s)
            return say(**out, saw="aborted")
        elif name == "active_close":
            c.send(b"E")
            c.recv()
            saw = "closed_first"
        elif name == "passive_close":
            c.send(b"C")
            saw = "eof" if c.recv() == b"" else "data"
    except OSError as e:
        saw = errno.errorcode.get(e.errno, str(e))
    c.s.close()
    say(**out, saw=saw)


CASES = ("refused", "connect_timeout", "gave_up", "peer_reset", "epipe", "local_abort", "active_close",
         "passive_close")
PORT = 8000


def client(family, wait, server_addr, closed_port, ghost):
    cases = [n for n in CASES if not (n == "gave_up" and wait == "block")]  # a blocking connect() waits for the kernel
    threads = [threading.Thread(target=case, args=(n, family, wait, server_addr, closed_port, ghost)) for n in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3], PORT)
    else:
        client(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
