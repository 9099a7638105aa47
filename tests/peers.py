"""Client and server processes for the privileged tests (loopback only).

    peers.py server FAMILY MODE     prints "READY <port> <listener pid> <worker pid>", serves one connection
    peers.py client FAMILY PORT MODE

Server modes: normal (read to EOF, then close), linger0 (close with RST at once),
prefork (the parent listens, a forked worker accepts and serves), hold (read to EOF,
wait for "go" on stdin before closing: a CLOSE_WAIT the test controls).
Client modes: normal (send, close first), wait (send, wait for the server to close).
Every socket has a timeout: nothing here can hang a test run.
"""
import os
import socket
import struct
import sys

TIMEOUT = 10


def addr(family):
    return ("127.0.0.1" if family == "4" else "::1")


def fam(family):
    return socket.AF_INET if family == "4" else socket.AF_INET6


def serve(conn, mode):
    conn.settimeout(TIMEOUT)
    if mode == "linger0":
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return
    while conn.recv(100):
        pass
    if mode == "hold":
        sys.stdout.write("EOF\n")
        sys.stdout.flush()
        sys.stdin.readline()
    conn.close()


def server(family, mode):
    ls = socket.socket(fam(family), socket.SOCK_STREAM)
    ls.settimeout(TIMEOUT)
    ls.bind((addr(family), 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    if mode == "prefork":
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            os.write(w, b"x")  # ready to accept
            conn, _ = ls.accept()
            serve(conn, "normal")
            os._exit(0)
        os.close(w)
        os.read(r, 1)
        print(f"READY {port} {os.getpid()} {child}", flush=True)
        os.waitpid(child, 0)
    else:
        print(f"READY {port} {os.getpid()} {os.getpid()}", flush=True)
        conn, _ = ls.accept()
        serve(conn, mode)
    ls.close()


def client(family, port, mode):
    s = socket.socket(fam(family), socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((addr(family), int(port)))
    except OSError as e:
        print(f"ERR {e.errno}", flush=True)
        return
    s.sendall(b"hello")
    if mode == "wait":
        try:
            while s.recv(100):
                pass
        except ConnectionResetError:
            print("RESET", flush=True)
    s.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    role, family = sys.argv[1], sys.argv[2]
    if role == "server":
        server(family, sys.argv[3])
    else:
        client(family, sys.argv[3], sys.argv[4])
