"""Build, compile and attach the BPF program, with no kernel headers.

bcc compiles ebpf/tcplife.bpf.c against the stub header tree in ebpf/stubs
(BCC_KERNEL_SOURCE); struct fields are read through offsets from the kernel's
BTF; optional tracepoints are feature-probed and compiled in only if present.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field

from tcplife_trace import ebpf
from . import btf, compiler_pages, prog_info, tracefs
from .bcc_import import import_bcc
from .event_layout import EVENT_SIZE, LIFE_SIZE, STAT_NSLOTS, layout_cflags
from .filters import Filters

DEFAULT_MAX_CONNS = 65536
DEFAULT_RB_PAGES = 4096  # 16 MiB: about 140k events of headroom
DEFAULT_OVERFLOW_PAGES = 64  # per CPU, for the events the ring refuses

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39

# What the kernel sends. It folds every connection in every mode (the state machine is the
# kernel's); "stream" sends every transition as an event carrying the fold after it AND the
# folded record of each ended connection (into the lives ring); "aggregate" the folded
# records alone (plus the events of what it does not fold: listeners, map-full strays);
# "both" is "stream" (the name the equivalence tests use).
MODES = ("stream", "aggregate", "both")


class ProgramError(Exception):
    """A reason the tracer cannot start, phrased for the user."""


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> None:
    caps = _capabilities()
    if caps & (1 << CAP_SYS_ADMIN) or (caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON)):
        return
    raise ProgramError("tracing needs root (or CAP_BPF and CAP_PERFMON): run it with sudo")


def _version_code() -> int:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    a, b, c = (int(x or 0) for x in m.groups()) if m else (0, 0, 0)
    return (a << 16) + (b << 8) + min(c, 255)


@dataclass
class Settings:
    filters: Filters = field(default_factory=Filters)
    max_conns: int = DEFAULT_MAX_CONNS
    rb_pages: int = DEFAULT_RB_PAGES
    mode: str = "stream"
    # pages per CPU of the overflow perf buffer; tests make it tiny so that both buffers refuse
    overflow_pages: int = DEFAULT_OVERFLOW_PAGES

    @property
    def record_size(self) -> int:
        """Bytes per record of the events ring (struct tlt_event, every mode)."""
        return EVENT_SIZE

    @property
    def lives_pages(self) -> int:
        """Pages of the lives ring (struct tlt_life, 592 bytes, one per connection): as many
        as the events ring's in every mode. A socket of a churning connection is about 5
        events of 168 ring bytes against its one record of 600: at half the size the lives
        ring filled first (measured: 0.87 of it at the native churn load), at the same size
        it fills no faster than the events ring."""
        return self.rb_pages


@dataclass
class Source:
    text: str
    cflags: list[str]
    notices: list[str]
    tracepoints: list[str]
    mode: str = "stream"
    record_size: int = EVENT_SIZE
    overflow_pages: int = DEFAULT_OVERFLOW_PAGES
    lives_record_size: int = LIFE_SIZE


def build_source(settings: Settings, tracefs_root: str, ancestor: bool = True) -> Source:
    """The program text and flags for this kernel; raises ProgramError if it cannot trace.
    ancestor: a tracepoint program may call bpf_get_current_ancestor_cgroup_id here (else a
    cgroup filter is applied in user space alone, with a notice)."""
    if settings.mode not in MODES:
        raise ProgramError(f"unknown mode {settings.mode!r}: one of {', '.join(MODES)}")
    if settings.rb_pages < 1 or settings.rb_pages & (settings.rb_pages - 1):
        raise ProgramError(f"ring buffer pages must be a power of two, not {settings.rb_pages}")
    op = settings.overflow_pages
    if op < 1 or op & (op - 1):
        raise ProgramError(f"overflow buffer pages must be a power of two, not {op}")
    try:
        present, notices = tracefs.probe(tracefs_root)
    except tracefs.TracefsError as e:
        raise ProgramError(str(e)) from None
    offsets, btf_notes = btf.kernel_offsets()
    notices += btf_notes
    health, health_notes = btf.health_fields()
    notices += health_notes
    defines = [
        f"#define TLT_MAX_CONNS {int(settings.max_conns)}",
        f"#define TLT_RB_PAGES {int(settings.rb_pages)}",
        f"#define TLT_LIVES_PAGES {int(settings.lives_pages)}",
        "#define TLT_AGGREGATE",  # every mode folds
    ]
    if settings.mode in ("stream", "both"):
        defines.append("#define TLT_STREAM")
    defines += [f"#define {k} {v}" for k, v in sorted(offsets.items())]
    defines += [f"#define {k} {v}" for k, v in health_defines(health).items()]
    for (_category, name), flds in present.items():
        defines.append(f"#define TLT_HAVE_{name.upper()}")
        if name == "tcp_send_reset":
            if "reason" in flds:
                defines.append("#define TLT_HAVE_TCP_SEND_RESET_REASON")
                if "enum sk_rst_reason" in flds["reason"]:
                    # the tracepoint struct names a kernel enum our stubs do not declare
                    defines.append("enum sk_rst_reason { TLT_SK_RST_REASON_UNUSED };")
            if "saddr" not in flds or "28" not in flds["saddr"]:
                defines.remove("#define TLT_HAVE_TCP_SEND_RESET")
                notices.append("tracepoint tcp/tcp_send_reset has an unknown layout here: "
                               "local aborts are not told apart from other closes")
        if name == "tcp_retransmit_skb":
            if "skaddr" not in flds or "state" not in flds:
                defines.remove("#define TLT_HAVE_TCP_RETRANSMIT_SKB")
                notices.append("tracepoint tcp/tcp_retransmit_skb has an unknown layout here: "
                               "retransmits are not counted as they happen (NA)")
            elif "err" in flds:
                defines.append("#define TLT_HAVE_TCP_RETRANSMIT_SKB_ERR")
        if name == "tcp_cong_state_set" and ("skaddr" not in flds or "cong_state" not in flds):
            defines.remove("#define TLT_HAVE_TCP_CONG_STATE_SET")
            notices.append("tracepoint tcp/tcp_cong_state_set has an unknown layout here: "
                           "loss and recovery episodes are not counted (NA)")
    defines += settings.filters.cdefines(ancestor=ancestor)
    if settings.filters.cgroups and not ancestor:
        notices.append("this kernel does not let a tracepoint program call bpf_get_current_ancestor_cgroup_id: "
                       "the cgroup filter is applied in user space only (every connection reaches it)")
    with open(ebpf.PROGRAM) as f:
        body = f.read()
    text = "\n".join(defines) + "\n" + body
    cflags = [
        f"-I{ebpf.EBPF_DIR}",
        f"-DTLT_LINUX_VERSION_CODE={_version_code()}",
        f"-DTLT_PAGE_SIZE={os.sysconf('SC_PAGE_SIZE')}",
        "-Wno-unused-function",
    ] + layout_cflags()
    tps = [f"{c}:{n}" for (c, n) in present]
    return Source(text, cflags, notices, tps, settings.mode, settings.record_size, op)


def health_defines(fields: dict) -> dict[str, int]:
    """The health fields present (btf.health_fields) as the program's macros: OFF_TP_*/SZ_TP_*,
    and TLT_HEALTH_BASE/TLT_HEALTH_SPAN, the one range of struct tcp_sock that holds them all
    (read in one copy at a connection's end); none at all when no field is present."""
    out = btf.health_cflags(fields)
    present = [m for m in fields.values() if m is not None]
    if present:
        base = min(m.offset for m in present) & ~7
        end = max(m.offset + m.size for m in present)
        out["TLT_HEALTH_BASE"] = base
        out["TLT_HEALTH_SPAN"] = (end - base + 7) & ~7
    return out


class LoadedProgram:
    """The compiled and attached program: its ring buffer and its counters."""

    def __init__(self, bpf, source: Source):
        self.bpf = bpf
        self.source = source

    def stats(self) -> list[int]:
        """Per-slot sums over CPUs of the kernel-side counters (TLT_STAT_*)."""
        table = self.bpf[b"stats"]
        return [sum(table[table.Key(i)]) for i in range(STAT_NSLOTS)]

    def programs(self) -> dict[str, int]:
        """Program fd of each attached tracepoint ("sock:inet_sock_set_state": fd)."""
        out = {}
        for name, fn in self.bpf.funcs.items():
            if name.startswith(b"tracepoint__"):
                out[name[len(b"tracepoint__"):].decode().replace("__", ":", 1)] = fn.fd
        return out

    def recursion_misses(self) -> dict[str, int] | None:
        """Per attached tracepoint, the hits its program missed because a BPF program was
        already running on that CPU (counted by the kernel from the program's load, which is
        when it was attached); None if this kernel does not count them (before 5.12)."""
        out = {}
        for tp, fd in self.programs().items():
            n = prog_info.recursion_misses(fd)
            if n is None:
                return None
            out[tp] = n
        return out

    def detach(self) -> None:
        """Stop every tracepoint (the maps, buffers and counters stay readable), and wait
        for runs already under way to finish, so the counters read afterwards are final."""
        for tp in list(self.bpf.tracepoint_fds):
            with contextlib.suppress(Exception):
                self.bpf.detach_tracepoint(tp)
        before = self.stats()
        for _ in range(50):  # a run lasts microseconds: this ends at the first look
            time.sleep(0.002)
            now = self.stats()
            if now == before:
                break
            before = now

    def open_overflow(self, callback, lost_callback) -> None:
        self.bpf[b"overflow"].open_perf_buffer(callback, page_cnt=self.source.overflow_pages,
                                               lost_cb=lost_callback)

    def poll_overflow(self) -> None:
        self.bpf.perf_buffer_poll(timeout=0)

    def ring_buffer(self) -> tuple[int, int]:
        """(map fd, data size in bytes) of the events ring buffer."""
        table = self.bpf[b"events"]
        return table.map_fd, table.max_entries

    def lives_ring(self) -> tuple[int, int]:
        """(map fd, data size in bytes) of the lives ring buffer (LIFE records)."""
        table = self.bpf[b"lives"]
        return table.map_fd, table.max_entries

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


_ANCESTOR_PROBE = b"""
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	return bpf_get_current_ancestor_cgroup_id(0) == 1;
}
"""
_ancestor: list[bool] = []


def ancestor_helper(bcc) -> bool:
    """Whether a tracepoint program may call bpf_get_current_ancestor_cgroup_id on this kernel:
    a tiny program that does nothing else, loaded once per process (bcc attaches it for that
    moment) and unloaded; the verifier's refusal is not printed."""
    if not _ancestor:
        saved = os.dup(2)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            try:
                bcc.BPF(text=_ANCESTOR_PROBE).cleanup()
                _ancestor.append(True)
            except Exception:  # noqa: BLE001 - bcc raises Exception for everything
                _ancestor.append(False)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return _ancestor[0]


def load(settings: Settings) -> LoadedProgram:
    """Compile and attach; every failure becomes a ProgramError with one clear line."""
    check_privileges()
    try:
        root = tracefs.find_tracefs()
    except tracefs.TracefsError as e:
        raise ProgramError(str(e)) from None
    bcc = import_bcc()
    os.environ["BCC_KERNEL_SOURCE"] = ebpf.STUB_KERNEL_SOURCE
    source = build_source(settings, root, ancestor=not settings.filters.cgroups or ancestor_helper(bcc))
    try:
        # clang and the verifier write to fd 2 directly; bcc raises a bare Exception
        bpf = bcc.BPF(text=source.text.encode(), cflags=source.cflags)
    except Exception as e:  # noqa: BLE001 - bcc raises Exception for everything
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Operation not permitted" in msg or isinstance(e, PermissionError):
            raise ProgramError("the kernel refused the BPF program (EPERM): run as root, "
                               "and check kernel.unprivileged_bpf_disabled / lockdown") from None
        raise ProgramError(f"the BPF program failed to compile or load: {msg[:200]} "
                           "(the compiler/verifier output is above; `tcplife-trace --ebpf` "
                           "prints the program)") from None
    compiler_pages.release()  # LLVM and clang are done: about 85 MB of RSS back
    return LoadedProgram(bpf, source)
