"""Soak: the live tracer's memory while it follows a long churn (bounded in count and time).

    .venv/bin/python bench/soak.py [--conns 2000000] [--workers 2] [-- tracer flags]

Starts `tcplife-trace` (default live mode, output to /dev/null), runs the churn of
bench/churn.py in a fresh network namespace in rounds, and samples the tracer's RSS
between rounds. Prints RSS at the start, after each round and at the end, and the
events lost. Flat means the last rounds hold what the first did.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_churn", os.path.join(HERE, "churn.py"))
churn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(churn)


rss_mb = churn.rss_mb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=2_000_000)
    ap.add_argument("--round", type=int, default=200_000, help="connections per churn round")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("flags", nargs="*", help="extra tcplife-trace flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        err = open(os.path.join(tmp, "err"), "w")
        proc = subprocess.Popen([churn.TRACER, "--report", report, *args.flags], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        if not churn.wait_ready(err.name, churn.re.compile("tracing TCP state changes"), proc):
            print(open(err.name).read(), file=sys.stderr)
            return 1
        time.sleep(1)
        samples = [(0, *rss_mb(proc.pid))]
        t0 = time.monotonic()
        done = 0
        while done < args.conns:
            _, rate, made = churn.churn_in_netns(min(args.round, args.conns - done), args.workers)
            done += made
            time.sleep(1)
            samples.append((done, *rss_mb(proc.pid)))
            print(f"  {done:>9,} connections  {rate:7,.0f} conn/s  RSS {samples[-1][1]:5.0f} MB  "
                  f"peak {samples[-1][2]:5.0f} MB", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        with open(report) as f:
            r = json.load(f)
    first = samples[1][1]
    last = samples[-1][1]
    print(f"soak: {done:,} connections in {elapsed:.0f} s; tracer RSS at start {samples[0][1]:.0f} MB, "
          f"after the first round {first:.0f} MB, at the end {last:.0f} MB (peak {samples[-1][2]:.0f} MB); "
          f"events lost {r['events_lost']}, evictions {r['evictions']}, connection map full {r['conn_map_full']}")
    print(f"  kernel mode {r.get('mode')}: {r['events_received']:,} records received of "
          f"{r['events_emitted_by_kernel']:,} sent; connection ends expected {2 * done:,} (2 per connection), "
          f"seen {r['connections_seen']:,}: closed {r['closed']:,}, still open {r['still_open']:,}; "
          f"ended {r['end_reasons']}")
    print(f"  tracer CPU {r['consumer_cpu_s']:.1f} s over {elapsed:.0f} s = {r['consumer_cpu_s'] / elapsed:.2f} of a CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
