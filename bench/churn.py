"""Churn benchmark: sustained loopback connection churn, untraced and under each tracer, side by side.

    sudo ./run.sh bench [--seconds 30] [--rounds 3] [--clients 2] [--only NAME,...]

The load is native (bench/loadgen.c, built here with gcc): C clients that connect, write a
byte, read to EOF and close, against C servers that read the byte and close first: the
highest churn this machine makes (Python reaches about half). Every connection makes
exactly 10 state changes. Each round runs every configuration for --seconds on the same
load in a fresh network namespace (an empty TIME_WAIT table), untraced first; the table
gives medians over the rounds:
  conn/s          connections/s under the tracer
  kept            / untraced in the same round
  of floor        / a bpftrace probe that only counts the tracepoint's hits (the cost of
                  the tracepoint itself), same round
  lost            events the tracer counted as lost (ours; from its report)
  captured        lines printed for the workload's port / lines expected (10 per connection
                  for per-transition views, 2 for per-connection ones); for ours with no
                  text output, events received / sent from the report
  CPU us/change   the tracer's CPU time (user + system, /proc) while the load ran and it
                  caught up, per state change of the load
  peak RSS MB     the tracer process's VmHWM
Loopback only; every step is bounded in count and time.
"""
from __future__ import annotations

import argparse
import json
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


def in_fresh_netns(command: str, timeout: float) -> str:
    """stdout of a shell command run in a network namespace of its own (loopback up), deleted
    after: every run starts with an empty TIME_WAIT table (past tcp_max_tw_buckets the kernel
    skips TIME_WAIT and later runs would get faster, which would skew every ratio)."""
    _netns_counter[0] += 1
    name = f"tltbench{os.getpid()}_{_netns_counter[0]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", name, "sh", "-c", f"ip link set lo up && exec {command}"],
                              check=True, capture_output=True, text=True, timeout=timeout).stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def churn_in_netns(conns: int, workers: int) -> tuple[int, float, int]:
    """churn() (the Python load) in a fresh network namespace."""
    out = in_fresh_netns(f'"{sys.executable}" "{os.path.abspath(__file__)}" --load {conns} --workers {workers}',
                         STEP_TIMEOUT + 30)
    port, rate, made = out.split()
    return int(port), float(rate), int(made)


LOADGEN_SRC = os.path.join(HERE, "loadgen.c")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_loadgen(tmp: str) -> str:
    exe = os.path.join(tmp, "loadgen")
    subprocess.run(["gcc", "-O2", "-o", exe, LOADGEN_SRC], check=True)
    return exe


def native_churn_in_netns(loadgen: str, seconds: float, clients: int, servers: int,
                          max_conns: int = 10_000_000) -> tuple[int, float, int]:
    """The native load for `seconds` in a fresh network namespace; returns (port,
    connections/s, connections made)."""
    out = in_fresh_netns(f'"{loadgen}" {seconds} {max_conns} {clients} {servers}', seconds + 60)
    port, rate, made, _elapsed = out.split()
    return int(port), float(rate), int(made)


def cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tool:
    """A configuration: argv, the ready pattern and stream, where its output goes, how to count."""
    def __init__(self, name, argv, ready, per_conn, ready_stream="stdout", count="lines", stdout="file"):
        self.name, self.argv, self.ready, self.per_conn = name, argv, re.compile(ready), per_conn
        self.ready_stream, self.count, self.stdout = ready_stream, count, stdout

    def ours(self) -> bool:
        return self.argv[0] == TRACER

    def available(self) -> bool:
        exe = self.argv[2] if self.argv[0] == "stdbuf" else self.argv[0]
        return shutil.which(exe) is not None or os.path.exists(exe)


def tools() -> list[Tool]:
    tr, ready = TRACER, r"tracing TCP state changes"
    return [
        Tool("bpftrace count (kernel floor)", ["bpftrace", "-e",
             "tracepoint:sock:inet_sock_set_state { @n = count(); }"], r"Attaching", None,
             count="bpftrace"),
        Tool("tcplife-trace", [tr], ready, 10, ready_stream="stderr"),
        Tool("tcplife-trace --json >/dev/null", [tr, "--json"], ready, 10, ready_stream="stderr",
             count="report", stdout="null"),
        Tool("tcplife-trace --json >file", [tr, "--json"], ready, 10, ready_stream="stderr", count="json"),
        Tool("tcplife-trace --record", [tr, "--record", "{tmp}/rec.arrow"], ready, 10,
             ready_stream="stderr", count="report", stdout="null"),
        Tool("tcplife-trace --lifecycles", [tr, "--lifecycles"], ready, 2, ready_stream="stderr"),
        Tool("tcplife-trace serve", [tr, "serve", "--metrics-port", "{port}"], ready, 10,
             ready_stream="stderr", count="report", stdout="null"),
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


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def peak_rss_mb(pid: int) -> float | None:
    try:
        return rss_mb(pid)[1]
    except (OSError, KeyError):
        return None


def _count_lines(path: str, pattern: str) -> int:
    """Lines of a (possibly GB-sized) output file that match: grep, not Python."""
    r = subprocess.run(["grep", "-c", "-E", pattern, path], capture_output=True, text=True)
    return int(r.stdout.strip() or 0)


def _argv(tool: Tool, tmp: str, report: str) -> list[str]:
    if not tool.ours():
        return list(tool.argv)  # (a bpftrace program has braces of its own)
    return [a.format(tmp=tmp, port=free_port()) for a in tool.argv] + ["--report", report]


def run_tool(tool: Tool, load, tmp: str) -> dict:
    """Start the tool, run the load under it, stop it; what it cost and what it caught."""
    out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    report = os.path.join(tmp, "report.json")
    for leftover in (report, os.path.join(tmp, "rec.arrow")):
        if os.path.exists(leftover):
            os.remove(leftover)
    with open(out if tool.stdout == "file" else os.devnull, "w") as fo, open(err, "w") as fe:
        t0 = time.monotonic()
        proc = subprocess.Popen(_argv(tool, tmp, report), stdout=fo, stderr=fe, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if not wait_ready(out if tool.ready_stream == "stdout" else err, tool.ready, proc):
            proc.kill()
            proc.wait()
            return {"tool": tool.name, "error": open(err).read().strip()[-200:] or "did not start"}
        startup = time.monotonic() - t0
        time.sleep(0.3)
        cpu0 = cpu_s(proc.pid)
        port, rate, made = load()
        time.sleep(3.0)  # let the tracer catch up, and the last FINs retransmitted after an RTO land
        cpu1 = cpu_s(proc.pid)
        rss = peak_rss_mb(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    res = {"tool": tool.name, "rate": rate, "startup_s": startup, "rss_mb": rss, "made": made,
           "cpu_us": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1e6 / (10 * made)}
    if tool.count == "bpftrace":
        m = re.search(r"@n: (\d+)", open(out, errors="replace").read())
        res["captured"] = int(m.group(1)) / (10 * made) if m else None  # counts every TCP change
    elif tool.count == "lines":
        res["captured"] = _count_lines(out, rf"(^|\s){port}(\s|$)") / (tool.per_conn * made)
    elif tool.count == "json":
        res["captured"] = _count_lines(out, rf'"[lr]port":{port}[,}}]') / (tool.per_conn * made)
    else:
        res["captured"] = None
    if os.path.exists(out) and tool.stdout == "file":
        os.remove(out)  # up to a GB of text per run
    if os.path.exists(report):
        with open(report) as f:
            r = json.load(f)
        res["lost"] = r["events_lost"] + r.get("conn_map_full", 0)
        res["delivered"] = r["events_received"] / max(1, r["events_emitted_by_kernel"])
    elif tool.ours():
        res["error"] = "no report: " + (open(err).read().strip()[-200:] or "exit %s" % proc.returncode)
    return res


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec % v


def table(results: dict[str, list[dict]], untraced: list[float]) -> str:
    """One row per configuration: medians over the rounds; ratios within each round."""
    floor_runs = next((runs for name, runs in results.items() if "floor" in name), None)
    lines = ["%-34s %8s %6s %8s %9s %9s %13s %9s %11s" % (
        "tracer", "conn/s", "kept", "of floor", "lost", "captured", "CPU us/change", "startup s", "peak RSS MB")]
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append("%-34s failed: %s" % (name, runs[0]["error"] if runs else "not run"))
            continue
        kept = _median([r["rate"] / untraced[i] for i, r in enumerate(runs) if "error" not in r])
        of_floor = None
        if floor_runs is not None:
            of_floor = _median([r["rate"] / f["rate"] for r, f in zip(runs, floor_runs)
                                if "error" not in r and "error" not in f])
        cap = _median([r.get("captured") if r.get("captured") is not None else r.get("delivered") for r in ok])
        lost = [r["lost"] for r in ok if "lost" in r]
        lines.append("%-34s %8.0f %6.2f %8s %9s %9s %13s %9.2f %11s" % (
            name, _median([r["rate"] for r in ok]), kept, _fmt(of_floor, "%.2f"),
            "-" if not lost else ",".join(str(x) for x in lost), _fmt(cap, "%.4f"),
            _fmt(_median([r["cpu_us"] for r in ok]), "%.2f"), _median([r["startup_s"] for r in ok]),
            _fmt(_median([r["rss_mb"] for r in ok]), "%.0f"))
            + ("" if len(ok) == len(runs) else f"   ({len(runs) - len(ok)} of {len(runs)} runs failed)"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="sustained load per configuration")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--clients", type=int, default=2, help="client processes of the native load")
    ap.add_argument("--servers", type=int, default=2, help="server processes of the native load")
    ap.add_argument("--only", help="comma list of tool name substrings to run (=NAME: that name exactly, "
                    "e.g. =tcplife-trace for the default view alone)")
    ap.add_argument("--load", type=int, help=argparse.SUPPRESS)  # internal: the Python churn, here
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        print(*churn(args.load, args.workers))
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (sudo ./run.sh bench)", file=sys.stderr)
        return 2
    if not 1 <= args.seconds <= 600 or not 1 <= args.rounds <= 20:
        print("bench: --seconds 1-600, --rounds 1-20", file=sys.stderr)
        return 2
    selected = [t for t in tools() if t.available()
                and (not args.only or "floor" in t.name or any(s[1:] == t.name if s.startswith("=") else s in t.name
                                                                for s in args.only.split(",")))]
    missing = [t.name for t in tools() if not t.available()]
    results: dict[str, list[dict]] = {t.name: [] for t in selected}
    untraced: list[float] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        loadgen = build_loadgen(tmp)

        def load():
            return native_churn_in_netns(loadgen, args.seconds, args.clients, args.servers)
        for rnd in range(args.rounds):
            print(f"bench: round {rnd + 1}/{args.rounds}: untraced ...", file=sys.stderr, flush=True)
            untraced.append(load()[1])
            for tool in selected:
                print(f"bench: round {rnd + 1}/{args.rounds}: {tool.name} ...", file=sys.stderr, flush=True)
                results[tool.name].append(run_tool(tool, load, tmp))
    print(f"\nchurn: native load ({args.clients} client + {args.servers} server processes, C), "
          f"{args.seconds:g} s sustained per configuration, {args.rounds} rounds (medians), 10 state "
          f"changes per connection, loopback of a fresh netns per run, {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}")
    print("untraced: %s conn/s (median; rounds: %s)\n" % (
        f"{statistics.median(untraced):,.0f}", ", ".join(f"{u:,.0f}" for u in untraced)))
    print(table(results, untraced))
    if missing:
        print("\nnot installed, not measured: " + ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
