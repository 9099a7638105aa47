"""Fleet benchmark: many synthetic host recordings analysed with the pandas and the Dask engine.

    .venv/bin/python bench/fleet.py [--hosts 50] [--transitions-per-host 200000] [--workers N]

Writes one recording per host (the mix of bench/analysis.py, each host its own seed,
clock and name), then runs `fleet.analyze` with each engine on the same files in this
run, checks the frames are identical, and prints the times and their ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import pyarrow.ipc as ipc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tcplife_trace import fleet, recording  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_analysis", os.path.join(HERE, "analysis.py"))
bench_analysis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_analysis)


def write_hosts(directory: str, hosts: int, per_host: int) -> int:
    total = 0
    for h in range(hosts):
        events = bench_analysis.synthesize(per_host, seed=h + 1)
        head = recording.header("none", 1_800_000_000 * 10**9 + h * 10**9, {"host": f"host{h:03d}"})
        schema = recording._schema(head)
        with open(os.path.join(directory, f"host{h:03d}.arrow"), "wb") as f, ipc.new_stream(f, schema) as w:
            for i in range(0, len(events), 1 << 20):
                w.write_batch(recording._batch(schema, events[i:i + (1 << 20)].tobytes()))
        total += int((events["kind"] == 1).sum())
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--transitions-per-host", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    import pandas as pd
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n = write_hosts(tmp, args.hosts, args.transitions_per_host)
        print(f"wrote {args.hosts} host recordings, {n:,} transitions, in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        times, results = {}, {}
        for engine in ("pandas", "dask"):
            t0 = time.perf_counter()
            results[engine] = fleet.analyze(tmp, engine, workers=args.workers)
            times[engine] = time.perf_counter() - t0
        for name in ("lifecycles", "state_durations", "leaks", "snapshots", "summary"):
            pd.testing.assert_frame_equal(results["pandas"][name], results["dask"][name], obj=name)
    print(f"{args.hosts} hosts, {n:,} transitions, {len(results['pandas']['lifecycles']):,} connections; "
          f"{os.cpu_count()} CPUs, Dask local cluster of {args.workers} worker processes")
    print(f"  pandas (one process)  {times['pandas']:7.2f} s   {n / times['pandas'] / 1e6:.2f} M transitions/s")
    print(f"  dask                  {times['dask']:7.2f} s   {n / times['dask'] / 1e6:.2f} M transitions/s"
          f"   ({times['pandas'] / times['dask']:.2f}x pandas, cluster start-up included)")
    print("  frames identical: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
