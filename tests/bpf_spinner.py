"""Another BPF user on the host, for the recursion-miss test: holds a CPU inside a BPF program.

    bpf_spinner.py CPU ITERATIONS MAX_SECONDS

Loads a test-only tracepoint program on syscalls:sys_enter_getppid that, for this process
only, runs a bounded loop of ITERATIONS kernel reads (tens of microseconds), pins itself to
CPU and calls getppid() in a loop: the CPU then spends nearly all its time inside a
kprobe/tracepoint BPF program, holding the per-CPU bpf_prog_active guard, so a softirq that
interrupts it there and fires one of the tracer's tracepoints makes the kernel skip the
tracer's program and count a recursion miss. Prints "READY <pid>", spins until stdin closes
or MAX_SECONDS pass.
"""
import os
import select
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tcplife_trace import ebpf  # noqa: E402
from tcplife_trace.probes.bcc_import import import_bcc  # noqa: E402

PROGRAM = r"""
BPF_ARRAY(sink, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != SPIN_TGID)
        return 0;
    int zero = 0;
    u64 *v = sink.lookup(&zero);
    if (!v)
        return 0;
    u64 acc = 0;
    for (int i = 0; i < SPIN_ITERS; i++) {
        u64 x = 0;
        bpf_probe_read_kernel(&x, sizeof(x), v);
        acc += x + i;
    }
    *v = acc;
    return 0;
}
"""


def main() -> int:
    cpu, iters, max_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    os.environ["BCC_KERNEL_SOURCE"] = ebpf.STUB_KERNEL_SOURCE
    bcc = import_bcc()
    b = bcc.BPF(text=PROGRAM.encode(), cflags=[f"-DSPIN_TGID={os.getpid()}", f"-DSPIN_ITERS={iters}",
                                                "-Wno-unused-function"])
    os.sched_setaffinity(0, {cpu})
    print(f"READY {os.getpid()}", flush=True)
    deadline = time.monotonic() + max_s
    poller = select.poll()
    poller.register(sys.stdin, select.POLLIN | select.POLLHUP)
    while time.monotonic() < deadline:
        for _ in range(200):
            os.getppid()
        if poller.poll(0):  # stdin closed (or written): the test is done
            break
    b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
