"""Offline analysis benchmark: synthetic recordings, load + frames, transitions per second.

    .venv/bin/python bench/analysis.py [--transitions 10000000]

Builds a recording with a realistic mix of lifecycles (client active close into
TIME_WAIT, accepted sockets closed passively after the owner's first read, refused
connects, resets, a few listeners), then times in a fresh process: load, the
lifecycles, state durations and the per-state summary (the issue's goal), then the
transitions frame (reported apart). Reports transitions/s and peak RSS relative to the
Arrow data size, for runs back to back and runs after an idle pause.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tcplife_trace import recording  # noqa: E402
from tcplife_trace.probes.event_layout import EVENT_DTYPE, EventKind, Flag  # noqa: E402
from tcplife_trace.probes.filters import Filters  # noqa: E402
from tcplife_trace.probes.tcp_states import TcpState as S  # noqa: E402

# (kind, old, new, delay_us, owner-context) per template; each template is one connection
CLIENT = [(1, S.CLOSE, S.SYN_SENT, 0), (1, S.SYN_SENT, S.ESTABLISHED, 60),
          (1, S.ESTABLISHED, S.FIN_WAIT1, 5000), (1, S.FIN_WAIT1, S.FIN_WAIT2, 40),
          (1, S.FIN_WAIT2, S.CLOSE, 30)]
SERVER = [(1, S.LISTEN, S.SYN_RECV, 0), (1, S.SYN_RECV, S.ESTABLISHED, 5), (6, 0, 0, 100),
          (1, S.ESTABLISHED, S.CLOSE_WAIT, 5000), (1, S.CLOSE_WAIT, S.LAST_ACK, 200),
          (1, S.LAST_ACK, S.CLOSE, 40)]
REFUSED = [(1, S.CLOSE, S.SYN_SENT, 0), (3, 0, 0, 40), (1, S.SYN_SENT, S.CLOSE, 1), (5, 0, 0, 1)]
RESET = [(1, S.CLOSE, S.SYN_SENT, 0), (1, S.SYN_SENT, S.ESTABLISHED, 60), (3, 0, 0, 20000),
         (1, S.ESTABLISHED, S.CLOSE, 1), (5, 0, 0, 1)]
MIX = [(CLIENT, 0.45), (SERVER, 0.45), (REFUSED, 0.05), (RESET, 0.05)]


def synthesize(n_transitions: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_conn = sum(w * sum(1 for e in t if e[0] == 1) for t, w in MIX)
    n_conns = int(n_transitions / per_conn)
    which = rng.choice(len(MIX), size=n_conns, p=[w for _, w in MIX])
    start = np.sort(rng.uniform(0, n_conns / 20000, n_conns) * 1e9).astype(np.int64) + 10**12
    parts = []
    for ti, (tmpl, _) in enumerate(MIX):
        conns = np.flatnonzero(which == ti)
        k = len(tmpl)
        ev = np.zeros(len(conns) * k, dtype=EVENT_DTYPE)
        gen = np.repeat(conns + 1, k)
        delays = np.cumsum([e[3] for e in tmpl]) * 1000
        jitter = rng.integers(0, 1000, size=(len(conns), k)).cumsum(axis=1)
        ev["ts_ns"] = (start[conns][:, None] + delays[None, :] + jitter).ravel()
        ev["gen"] = gen
        ev["skaddr"] = np.uint64(0xFFFF888000000000) + (gen % 4096).astype(np.uint64) * np.uint64(4096)
        ev["kind"] = np.tile([e[0] for e in tmpl], len(conns))
        ev["oldstate"] = np.tile([e[1] for e in tmpl], len(conns))
        ev["newstate"] = np.tile([e[2] for e in tmpl], len(conns))
        ev["seq"] = np.tile(np.arange(k), len(conns))
        ev["family"] = 2
        ev["flags"] = int(Flag.NETNS | Flag.UID)
        ev["netns"] = 4026531833
        ev["pid"] = 1000 + (gen % 50)
        ev["comm"] = b"bench"  # (EVENT_DTYPE has comm as one S16 value)
        ev["value"] = np.where(ev["kind"] == EventKind.ERROR, 111 if tmpl is REFUSED else 104, 0)
        server = tmpl is SERVER
        ev["sport"] = np.where(server, 8080, np.where(ev["oldstate"] == S.CLOSE, 0, 30000 + gen % 30000))
        ev["dport"] = np.where(server, 30000 + gen % 30000, 8080)
        ev["saddr"][:, :4] = (127, 0, 0, 1)
        ev["daddr"][:, 0] = 10  # many peers: 10.0.x.y
        ev["daddr"][:, 2] = (gen // 256) % 256
        ev["daddr"][:, 3] = gen % 256
        parts.append(ev)
    events = np.concatenate(parts)
    return events[np.argsort(events["ts_ns"], kind="stable")]


def write(path: str, events: np.ndarray) -> int:
    import pyarrow.ipc as ipc
    schema = recording._schema(recording.header(Filters(), 0))
    with open(path, "wb") as f, ipc.new_stream(f, schema) as w:
        for i in range(0, len(events), 1 << 20):
            w.write_batch(recording._batch(schema, events[i:i + (1 << 20)].tobytes()))
    return os.path.getsize(path)


def _hwm() -> int:
    """Peak RSS of this process image (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str) -> dict:
    """Runs in a fresh process so that peak RSS is the analysis's own."""
    from tcplife_trace import load
    import pandas, pyarrow  # noqa: F401,E401 - count the libraries in the baseline
    base_rss = _hwm()
    t = {}
    t0 = time.perf_counter()
    rec = load(path)
    t["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lc = rec.lifecycles()
    t["lifecycles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = rec.state_durations()
    t["state_durations"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec.summary()
    t["summary"] = time.perf_counter() - t0
    peak = _hwm()
    t0 = time.perf_counter()  # not in the goal (the issue times the four above), measured after
    tr = rec.transitions
    transitions_s = time.perf_counter() - t0
    return {"times": t, "transitions_frame_s": transitions_s, "transitions": len(tr),
            "connections": len(lc), "durations": len(sd), "peak_rss": peak, "peak_rss_all": _hwm(),
            "base_rss": base_rss, "arrow_bytes": rec.events.nbytes}


def touch(mb: int) -> dict:
    """Time to write `mb` MB of memory new to this process, then the same memory again."""
    a = np.empty(mb << 17)  # float64: mb MiB
    t0 = time.perf_counter()
    a.fill(1.0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    a.fill(2.0)
    return {"mb": mb, "first": first, "again": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transitions", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3, help="measurements of each kind (default 3)")
    ap.add_argument("--idle", type=float, default=5.0,
                    help="seconds idle before each 'after idle' measurement (default 5)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--touch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.touch:
        print(json.dumps(touch(args.touch)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.arrow")
        t0 = time.perf_counter()
        events = synthesize(args.transitions)
        size = write(path, events)
        del events
        print(f"synthesized and wrote {size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        # Fresh processes, one after the other ("back to back"), then each after a pause: on
        # a VM whose freed memory goes back to the host (virtio-balloon free page reporting),
        # memory touched after a pause costs several times more, and the pause is the usual
        # case for a one-off `analyze`.
        touched = {}
        for kind, pause in (("back to back", 0.0), ("after idle", args.idle)):
            for _ in range(args.runs):
                time.sleep(pause)
                r = json.loads(subprocess.run([sys.executable, __file__, "--measure", path], check=True,
                                              capture_output=True, text=True).stdout)
                results.append((kind, r))
            time.sleep(pause)  # the machine's own cost of fresh memory, in the same conditions
            touched[kind] = json.loads(subprocess.run([sys.executable, __file__, "--touch", "512"], check=True,
                                                      capture_output=True, text=True).stdout)
    r = results[0][1]
    print(f"{r['transitions']:,} transitions, {r['connections']:,} connections, {r['durations']:,} "
          f"state durations, {r['arrow_bytes'] / 2**20:.0f} MiB of Arrow data")
    steps = list(r["times"])
    print(f"  {'run':14s}" + "".join(f"{k:>16s}" for k in steps) + f"{'total':>9s}{'M/s':>7s}"
          f"{'peak RSS':>10s}{'x Arrow':>9s}   transitions frame (not in the goal)")
    by_kind: dict[str, list[float]] = {}
    for kind, r in results:
        total = sum(r["times"].values())
        by_kind.setdefault(kind, []).append(r["transitions"] / total / 1e6)
        print(f"  {kind:14s}" + "".join(f"{r['times'][k]:15.2f}s" for k in steps) + f"{total:8.2f}s"
              f"{r['transitions'] / total / 1e6:7.2f}{r['peak_rss'] / 2**20:8.0f}MB"
              f"{r['peak_rss'] / r['arrow_bytes']:8.1f}x   {r['transitions_frame_s']:.2f} s, peak "
              f"{r['peak_rss_all'] / r['arrow_bytes']:.1f}x")
    for kind, rates in by_kind.items():
        print(f"median {kind}: {statistics.median(rates):.2f} M transitions/s "
              f"(load + lifecycles + state durations + summary; goal >= 5)")
    for kind, t in touched.items():
        print(f"this machine, {kind}: a fresh process writing {t['mb']} MB of new memory takes "
              f"{t['first']:.2f} s, the same memory written again {t['again']:.2f} s")
    print(f"(interpreter and libraries alone: {r['base_rss'] / 2**20:.0f} MiB; peak RSS counts the "
          "recording's memory-mapped pages that were read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
