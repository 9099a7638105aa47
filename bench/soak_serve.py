"""Soak of `serve`: the agent's memory over a long run under a moderate loopback churn.

    .venv/bin/python bench/soak_serve.py [--minutes 30] [--rate 150] [--sample 30]

Starts `tcplife-trace serve` (nice 10, its own consumer at --nice 10 too, so that a soak
running beside other work takes only spare CPU) with the socket looks on (--poll-interval 5),
and a churn child: --rate loopback connections a second (connect, 100 bytes each way,
the client closes first), plus a scraper of /metrics every 5 s that, every 30 s, also
sends a garbage request and hangs up in the middle of a scrape. Samples the tracer's RSS
every --sample seconds and prints it, then the trend: RSS at fixed marks, the growth per
10 minutes over each half of the run, the peak, and the tracebacks and lines on the
tracer's stderr. Loopback only; bounded by --minutes and --rate.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_churn", os.path.join(HERE, "churn.py"))
churn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(churn)
TRACER, rss_mb = churn.TRACER, churn.rss_mb


def _serve_conn(c: socket.socket) -> None:
    with c:
        c.settimeout(5)
        try:
            c.recv(100)
            c.sendall(b"y" * 100)
            c.recv(1)  # EOF: the client closes first (its side goes to TIME_WAIT)
        except OSError:
            pass


def churn(rate: float, stop_at: float, counter: list) -> None:
    """rate connections a second on loopback until stop_at (monotonic)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(512)
    port = ls.getsockname()[1]

    def accept():
        ls.settimeout(0.5)
        while time.monotonic() < stop_at:
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            threading.Thread(target=_serve_conn, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() < stop_at:
        wait = t0 + counter[0] / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"x" * 100)
                c.recv(100)
        except OSError:
            counter[1] += 1
        counter[0] += 1
    ls.close()


def scrape(port: int, stop_at: float, counts: list) -> None:
    """/metrics every 5 s; every 30 s also garbage, and a client that leaves mid-scrape."""
    n = 0
    while time.monotonic() < stop_at:
        time.sleep(5)
        n += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                while c.recv(65536):
                    pass
            counts[0] += 1
            if n % 6 == 0:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"\x16\x03\x01garbage\r\n\r\n")
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    # SO_LINGER 0: the close is a RST while the server is still writing
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                counts[1] += 2
        except OSError:
            counts[2] += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=150.0, help="connections per second (bounded)")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    args = ap.parse_args()
    if not 0 < args.rate <= 2000:
        ap.error("--rate must be in (0, 2000]")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        errpath = os.path.join(tmp, "err")
        err = open(errpath, "w")
        proc = subprocess.Popen(["nice", "-n", "10", TRACER, "serve", "--nice", "10", "--metrics-port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 60
        while "tracing TCP state changes" not in open(errpath).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(errpath).read(), file=sys.stderr)
                return 1
            time.sleep(0.2)
        time.sleep(2)
        t0 = time.monotonic()
        stop_at = t0 + args.minutes * 60
        made, scraped = [0, 0], [0, 0, 0]
        os.nice(15)  # the load takes spare CPU only
        threads = [threading.Thread(target=churn, args=(args.rate, stop_at, made), daemon=True),
                   threading.Thread(target=scrape, args=(port, stop_at, scraped), daemon=True)]
        for t in threads:
            t.start()
        samples = [(0.0, *rss_mb(proc.pid), 0)]
        print(f"  {'minute':>6} {'connections':>11} {'RSS MB':>7} {'peak MB':>7}", flush=True)
        print(f"  {0:6.1f} {0:11,} {samples[0][1]:7.1f} {samples[0][2]:7.1f}", flush=True)
        while time.monotonic() < stop_at:
            time.sleep(min(args.sample, max(0.0, stop_at - time.monotonic())))
            if proc.poll() is not None:
                print(f"soak_serve: the tracer exited ({proc.returncode}):\n{open(errpath).read()}", file=sys.stderr)
                return 1
            samples.append(((time.monotonic() - t0) / 60, *rss_mb(proc.pid), made[0]))
            print(f"  {samples[-1][0]:6.1f} {made[0]:11,} {samples[-1][1]:7.1f} {samples[-1][2]:7.1f}", flush=True)
        for t in threads:
            t.join(timeout=30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        err.close()
        stderr = open(errpath).read()

    def at(minute: float) -> float:
        return min(samples, key=lambda s: abs(s[0] - minute))[1]

    def growth(a: float, b: float) -> float:  # MB per 10 minutes between two marks
        return (at(b) - at(a)) / (b - a) * 10 if b > a else 0.0
    total = samples[-1][0]
    marks = [m for m in (1, 5, 10, 15, 20, 30, 45, 60, 90, 120) if m <= total] + [total]
    print(f"soak_serve: {total:.1f} min, {made[0]:,} connections ({made[0] / (total * 60):.0f}/s, "
          f"{made[1]} failed), {scraped[0]} scrapes, {scraped[1]} garbage or abandoned requests")
    print("  RSS MB at minute " + ", ".join(f"{m:g}: {at(m):.1f}" for m in marks)
          + f"; peak {max(s[2] for s in samples):.1f}")
    print(f"  growth per 10 min (from minute 1, after the start-up): first half {growth(1, (1 + total) / 2):+.1f} MB, "
          f"second half "
          f"{growth((1 + total) / 2, total):+.1f} MB")
    print(f"  tracer stderr: {len(stderr.splitlines())} lines, {stderr.count('Traceback')} tracebacks, "
          f"exit status {proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
