"""Startup: command start to probes attached, warm and cold, side by side.

    .venv/bin/python bench/startup.py [--runs 5] [-- tracer flags]

warm  the tracer was started just before: page cache full, BTF offsets cached
cold  as after a boot: the page cache dropped (vm.drop_caches=3: Python, bcc, LLVM
      and the venv read from disk again) and the BTF offsets cache removed

"Attached" is the tracer's ready line on stderr, printed once every probe is attached
and the ring buffer is open. Each figure is the median of --runs runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRACER = os.path.join(os.path.dirname(sys.executable), "tcplife-trace")
READY = re.compile(r"ready in ([0-9.]+) s")
CACHE = os.environ.get("TCPLIFE_TRACE_CACHE", "/run/tcplife-trace")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    shutil.rmtree(CACHE, ignore_errors=True)


def one_start(flags: list[str]) -> tuple[float, float]:
    """(seconds from exec to the ready line, seconds the tracer reports for loading the program)"""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([TRACER, *flags, "--duration", "30"], stdout=subprocess.DEVNULL, stderr=err)
        deadline = t0 + 60
        while time.monotonic() < deadline:
            err.seek(0)
            m = READY.search(err.read())
            if m:
                total = time.monotonic() - t0
                break
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"tracer exited: {err.read().strip()[-300:]}")
            time.sleep(0.005)
        else:
            proc.kill()
            raise RuntimeError("tracer did not become ready in 60 s")
        proc.terminate()
        proc.wait(timeout=30)
    return total, float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("flags", nargs="*", help="tracer flags (after --)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("startup: run as root", file=sys.stderr)
        return 2
    flags = args.flags or ["--poll-interval", "0"]
    one_start(flags)  # fill the caches
    warm, cold = [], []
    for _ in range(args.runs):  # alternate, so that both see the same machine state
        warm.append(one_start(flags))
        drop_caches()
        cold.append(one_start(flags))
    one_start(flags)  # leave the offsets cache in place

    def show(name, xs):
        total = statistics.median(x[0] for x in xs)
        load = statistics.median(x[1] for x in xs)
        print(f"{name:<5} exec -> attached {total:5.2f} s   (of which program build + compile + attach "
              f"{load:4.2f} s; min {min(x[0] for x in xs):.2f}, max {max(x[0] for x in xs):.2f})")
        return total
    print(f"startup of `tcplife-trace {' '.join(flags)}`, median of {args.runs} runs, {os.cpu_count()} CPUs, "
          f"kernel {os.uname().release}")
    w = show("warm", warm)
    c = show("cold", cold)
    print(f"cold / warm = {c / w:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
