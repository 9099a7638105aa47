"""Churn benchmark: short loopback connections, untraced and under each tracer, side by side.

    sudo ./run.sh bench [--conns N] [--workers W] [--rounds R]

Every connection makes exactly 10 state changes (client: CLOSE>SYN_SENT>ESTABLISHED>
FIN_WAIT1>FIN_WAIT2>CLOSE; server child: LISTEN>SYN_RECV>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE).
For each configuration the same bounded workload runs on a fresh port and we report:
  rate kept       connections/s under the tracer / connections/s untraced (same run)
  captured        lines the tracer printed for the workload's port / lines expected (a client
                  still in FIN_WAIT1 when the namespace is deleted never makes its last two
                  changes: up to 0.1% of them; tcplife-trace's own received/sent is exact)
  startup s       exec to the tracer's ready line
  peak RSS MB     the tracer process's VmHWM
Loopback only; every step is bounded in count and time.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRACER = os.path.join(os.path.dirname(sys.executable), "tcplife-trace")
STEP_TIMEOUT = 120


def _server(ls: socket.socket, stop_at: float) -> None:
    ls.settimeout(1.0)
    while time.monotonic() < stop_at:
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        c.recv(1)  # EOF: the client closed first
        c.close()


def churn(conns: int, workers: int) -> tuple[int, float, int]:
    """Run the workload on a fresh port; returns (port, connections/s, connections made)."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    port = ls.getsockname()[1]
    stop_at = time.monotonic() + STEP_TIMEOUT
    servers = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            _server(ls, stop_at)
            os._exit(0)
        servers.append(pid)
    per = conns // workers
    r, w = os.pipe()
    clients = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)  # start together
            made = 0
            for _ in range(per):
                if time.monotonic() > stop_at:
                    break
                s = socket.socket()
                s.connect(("127.0.0.1", port))
                s.close()
                made += 1
            os._exit(0 if made == per else 1)
        clients.append(pid)
    os.close(r)
    t0 = time.monotonic()
    os.write(w, b"x" * workers)
    ok = all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in clients)
    elapsed = time.monotonic() - t0
    os.close(w)
    time.sleep(0.2)  # let the servers close their last sockets
    for p in servers:
        os.kill(p, signal.SIGKILL)
        os.waitpid(p, 0)
    ls.close()
    if not ok:
        raise RuntimeError("churn clients did not finish in time")
    return port, per * workers / elapsed, per * workers


_netns_counter = [0]


def churn_in_netns(conns: int, workers: int) -> tuple[int, float, int]:
    """churn() in a network namespace of its own, deleted after: every run starts with an
    empty TIME_WAIT table (past tcp_max_tw_buckets the kernel skips TIME_WAIT and later
    runs would get faster, which would skew every ratio)."""
    _netns_counter[0] += 1
    name = f"tltbench{os.getpid()}_{_netns_counter[0]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", name, "sh", "-c",
             f'ip link set lo up && exec "{sys.executable}" "{os.path.abspath(__file__)}" '
             f"--load {conns} --workers {workers}"],
            check=True, capture_output=True, text=True, timeout=STEP_TIMEOUT + 30).stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    port, rate, made = out.split()
    return int(port), float(rate), int(made)


class Tool:
    def __init__(self, name, argv, ready, per_conn, ready_stream="stdout", count="lines"):
        self.name, self.argv, self.ready, self.per_conn = name, argv, re.compile(ready), per_conn
        self.ready_stream, self.count = ready_stream, count

    def available(self) -> bool:
        exe = self.argv[2] if self.argv[0] == "stdbuf" else self.argv[0]
        return shutil.which(exe) is not None or os.path.exists(exe)


def tools() -> list[Tool]:
    tr = TRACER
    return [
        Tool("bpftrace count (kernel floor)", ["bpftrace", "-e",
             "tracepoint:sock:inet_sock_set_state { @n = count(); }"], r"Attaching", None,
             count="bpftrace"),
        Tool("tcplife-trace", [tr], r"tracing TCP state changes", 10, ready_stream="stderr"),
        Tool("tcplife-trace --lifecycles", [tr, "--lifecycles"], r"tracing TCP state changes", 2,
             ready_stream="stderr"),  # kernel aggregation: one record per connection
        Tool("tcplife-trace --lifecycles stream", [tr, "--lifecycles", "--kernel-mode", "stream"],
             r"tracing TCP state changes", 2, ready_stream="stderr"),
        Tool("bcc tcpstates-bpfcc", ["stdbuf", "-oL", "tcpstates-bpfcc"], r"SKADDR", 10),
        Tool("bcc tcplife-bpfcc", ["stdbuf", "-oL", "tcplife-bpfcc"], r"PID", 2),
        Tool("libbpf-tools tcpstates", ["stdbuf", "-oL", "/usr/sbin/tcpstates"], r"SKADDR", 10),
        Tool("libbpf-tools tcplife", ["stdbuf", "-oL", "/usr/sbin/tcplife"], r"PID", 2),
    ]


def wait_ready(path: str, pattern, proc, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with open(path, errors="replace") as f:
            if pattern.search(f.read()):
                return True
        time.sleep(0.02)
    return False


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_tool(tool: Tool, conns: int, workers: int, tmp: str) -> dict:
    out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    report = os.path.join(tmp, "report.json")
    if os.path.exists(report):
        os.remove(report)
    argv = tool.argv + (["--report", report] if tool.argv[0] == TRACER else [])
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not wait_ready(out if tool.ready_stream == "stdout" else err, tool.ready, proc):
            proc.kill()
            proc.wait()
            return {"tool": tool.name, "error": open(err).read().strip()[-200:] or "did not start"}
        startup = time.monotonic() - t0
        time.sleep(0.3)
        port, rate, made = churn_in_netns(conns, workers)
        time.sleep(3.0)  # let the tracer catch up, and the last FINs retransmitted after an RTO land
        rss = peak_rss_mb(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = open(out, errors="replace").read()
    res = {"tool": tool.name, "rate": rate, "startup_s": startup, "rss_mb": rss}
    if tool.count == "bpftrace":
        m = re.search(r"@n: (\d+)", text)
        res["captured"] = int(m.group(1)) / (10 * made) if m else None  # counts every TCP change
    else:
        p = str(port)
        lines = sum(1 for ln in text.splitlines() if p in ln.split())
        res["captured"] = lines / (tool.per_conn * made)
    if os.path.exists(report):
        import json
        with open(report) as f:
            r = json.load(f)
        res["lost"] = r["events_lost"] + r["conn_map_full"]
        res["delivered"] = r["events_received"] / max(1, r["events_emitted_by_kernel"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=30000, help="connections per configuration")
    ap.add_argument("--workers", type=int, default=2, help="client (and server) processes")
    ap.add_argument("--only", help="comma list of tool name substrings to run")
    ap.add_argument("--load", type=int, help=argparse.SUPPRESS)  # internal: run one churn here
    args = ap.parse_args()
    if args.load:
        print(*churn(args.load, args.workers))
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (sudo ./run.sh bench)", file=sys.stderr)
        return 2
    selected = [t for t in tools() if t.available()
                and (not args.only or any(s in t.name for s in args.only.split(",")))]
    missing = [t.name for t in tools() if not t.available()]
    results = []
    base = []
    with tempfile.TemporaryDirectory() as tmp:
        _, rate, _ = churn_in_netns(args.conns, args.workers)
        base.append(rate)
        for tool in selected:
            print(f"bench: {tool.name} ...", file=sys.stderr, flush=True)
            results.append(run_tool(tool, args.conns, args.workers, tmp))
        _, rate, _ = churn_in_netns(args.conns, args.workers)
        base.append(rate)
    untraced = statistics.mean(base)
    print(f"\nchurn: {args.conns} connections x 10 state changes, {args.workers} client + "
          f"{args.workers} server processes, loopback of a fresh netns per run, {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}")
    print(f"untraced: {untraced:,.0f} conn/s (before {base[0]:,.0f}, after {base[1]:,.0f})\n")
    floor = next((r["rate"] for r in results if "floor" in r["tool"] and "rate" in r), None)
    print("%-34s %8s %9s %9s %9s %9s %11s" % ("tracer", "conn/s", "rate kept", "of floor", "captured",
                                              "startup s", "peak RSS MB"))
    for r in results:
        if "error" in r:
            print("%-34s failed: %s" % (r["tool"], r["error"]))
            continue
        cap = "-" if r["captured"] is None else "%.3f" % r["captured"]
        print("%-34s %8.0f %9.2f %9s %9s %9.2f %11s" % (
            r["tool"], r["rate"], r["rate"] / untraced, "-" if floor is None else "%.2f" % (r["rate"] / floor),
            cap, r["startup_s"], "-" if r["rss_mb"] is None else "%.0f" % r["rss_mb"])
            + (f"   (lost in kernel: {r['lost']}; received/sent {r['delivered']:.6f})" if "lost" in r else ""))
    if missing:
        print("\nnot installed, not measured: " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
