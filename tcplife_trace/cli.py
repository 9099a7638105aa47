"""tcplife-trace command line: parse flags, call the library, print."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import click

from . import __version__, losses
from tcplife_trace.probes import program as prog
from tcplife_trace.probes import tracefs
from tcplife_trace.probes.bcc_import import BccMissing
from tcplife_trace.probes.filters import Filters
from .stop_signals import StopRequest
from .render.views import summary_text

EXIT_OK, EXIT_DEGRADED, EXIT_ERROR = 0, 1, 2


class UserError(Exception):
    """Something the user can fix; printed as one line, exit 2."""


class Seconds(click.FloatRange):
    """A number of seconds: click's FloatRange lets inf and nan through (`doctor --duration nan`
    never ended, `--duration inf` was an OverflowError)."""
    name = "seconds"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return rv


class PowerOfTwo(click.IntRange):
    name = "power of two"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv & (rv - 1):
            self.fail(f"{rv} is not a power of two", param, ctx)
        return rv


def _int_list(value: str | None, what: str, lo: int, hi: int) -> tuple[int, ...]:
    if not value:
        return ()
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit() or not lo <= int(part) <= hi:
            raise click.BadParameter(f"{part!r} is not a {what} ({lo}-{hi}); give a comma list like 80,443")
        out.append(int(part))
    return tuple(out)


def _filters(pid, lport, rport, ipv4, ipv6, cgroup=(), container=()) -> Filters:
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other")
    homes = ()
    if cgroup or container:
        from . import containers
        try:
            homes = containers.targets(cgroup, container)
        except ValueError as e:
            raise UserError(str(e)) from None
    return Filters(pids=_int_list(pid, "pid", 1, 2**22), lports=_int_list(lport, "port", 1, 65535),
                   rports=_int_list(rport, "port", 1, 65535), family=4 if ipv4 else 6 if ipv6 else None,
                   cgroups=homes)


def _home_options(f):
    """--cgroup and --container, on the commands that trace (trace, serve, doctor)."""
    for opt in reversed([
        click.option("--cgroup", "cgroups", metavar="PATH", multiple=True,
                     help="Only connections whose owner's cgroup v2 is PATH or below it (a directory "
                          "under the cgroup2 mount, or a path relative to it; repeatable)."),
        click.option("--container", "containers", metavar="ID", multiple=True,
                     help="Only connections whose owner is in this container (its id, or a unique "
                          "prefix of 12 or more hex digits; repeatable)."),
    ]):
        f = opt(f)
    return f


def _filter_options(f):
    """-p -L -D -4 -6 as the subcommands take them (the live command words -p its own way)."""
    for opt in reversed([
        click.option("-p", "--pid", metavar="PID[,PID]", help="Only connections owned by these processes."),
        click.option("-L", "--localport", metavar="PORT[,PORT]", help="Only these local ports."),
        click.option("-D", "--remoteport", metavar="PORT[,PORT]", help="Only these remote ports."),
        click.option("-4", "--ipv4", is_flag=True, help="IPv4 only."),
        click.option("-6", "--ipv6", is_flag=True, help="IPv6 only."),
    ]):
        f = opt(f)
    return f


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


_EXAMPLES = """\b
examples:
    tcplife-trace                    # every TCP state change, until Ctrl-C
    tcplife-trace -T --duration 10   # with wall time, for 10 s
    tcplife-trace --lifecycles -w    # one line per finished connection, wide
    tcplife-trace -p 181 -L 80,443   # owned by PID 181, local ports 80 and 443
    tcplife-trace -D 5432 -6         # IPv6 connections to remote port 5432
    tcplife-trace --cgroup /system.slice/nginx.service   # connections of one cgroup (and below)
    tcplife-trace --container 4f0c1d2e3b4a --json     # one container's, with its cgroup on each
    tcplife-trace --json --lifecycles > conns.jsonl   # JSON Lines, summary as JSON on stderr
    tcplife-trace --record /var/tmp/t.arrow           # also record for offline analysis
    tcplife-trace analyze /var/tmp/t.arrow            # ... and analyse the recording
    tcplife-trace doctor --duration 30                # snapshot, trace 30 s, report leaks
    tcplife-trace serve --metrics-port 9470           # agent: Prometheus metrics, findings

\b
thresholds (--threshold NAME=VALUE):
    close_wait_age_s fin_wait1_age_s fin_wait2_age_s last_ack_age_s closing_age_s
    pile_warning pile_critical syn_sent_failures syn_sent_age_s fanout_destinations
    syn_recv_per_listener time_wait_use time_wait_rate idle_established_s peer_connections
    retrans_storm_connections retrans_storm_segments retrans_storm_share slow_peer_samples
    slow_peer_others slow_peer_factor slow_peer_excess_ms retrans_deaths
"""


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=_EXAMPLES)
@click.option("-T", "--time", "hms", is_flag=True, help="Prefix lines with HH:MM:SS wall time.")
@click.option("-t", "--timestamp", "seconds", is_flag=True, help="Prefix lines with seconds since start.")
@click.option("-w", "--wide", is_flag=True, help="Wide columns (IPv6 addresses, 16-char COMM).")
@click.option("-p", "--pid", metavar="PID[,PID]", help="Only connections owned by these processes "
              "(or accepted on their listeners).")
@click.option("-L", "--localport", metavar="PORT[,PORT]", help="Only these local ports.")
@click.option("-D", "--remoteport", metavar="PORT[,PORT]", help="Only these remote ports.")
@click.option("-4", "--ipv4", is_flag=True, help="IPv4 only (v4-mapped IPv6 counts as IPv4).")
@click.option("-6", "--ipv6", is_flag=True, help="IPv6 only.")
@_home_options
@click.option("--duration", type=Seconds(min=0, min_open=True), metavar="S",
              help="Stop after S seconds (default: until Ctrl-C or SIGTERM).")
@click.option("--lifecycles", is_flag=True, help="One line per finished connection instead of per state change.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines of the same records on stdout.")
@click.option("-s", "--csv", "as_csv", is_flag=True, help="Comma-separated values of the same records on "
              "stdout, a header line first (bcc tcplife's -s).")
@click.option("--strict", is_flag=True, help="Exit 1 if any event was lost or any connection went untracked.")
@click.option("--max-conns", type=click.IntRange(1024, 4_194_304), default=prog.DEFAULT_MAX_CONNS,
              show_default=True, help="Size of the kernel connection map.")
@click.option("--ring-pages", type=PowerOfTwo(1, 1 << 20), default=prog.DEFAULT_RB_PAGES,
              show_default=True, help="Ring buffer size in pages (a power of two).")
@click.option("--nice", "niceness", type=click.IntRange(-20, 19), default=-5, show_default=True,
              help="Scheduling priority of the consumer: above the traced workload so that, when the "
                   "CPUs are saturated, the tracer keeps up instead of losing events.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write every event to FILE (Arrow stream, mode 0600, on the disk within a second) "
                   "for offline analysis with tcplife_trace.load(FILE).")
@click.option("--host", "record_host", metavar="NAME",
              help="The host name the recording's header gives (analyze and fleet analysis know it by "
                   "it; default: this machine's hostname). Needs --record.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
              metavar="FILE", help="Also write the exit summary as JSON to FILE; `-`: as the last line on "
                                   "stdout, {\"type\": \"summary\", ...} (after --json's records).")
@click.option("--poll-interval", type=Seconds(min=0), default=5.0, show_default=True, metavar="S",
              help="Look at every socket (sock_diag, all namespaces) every S seconds and print leak "
                   "findings as they appear; 0 turns the detectors off.")
@click.option("--threshold", "threshold_pairs", multiple=True, metavar="NAME=VALUE",
              help="Change a detector threshold, e.g. close_wait_age_s=30 (repeatable).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve Prometheus metrics on PORT while tracing (see also `serve`).")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address the metrics endpoint binds to (loopback unless you say otherwise).")
@click.option("--metrics-labels", default="", metavar="port,comm,container",
              help="Opt-in labels on the connection counters: the service port, the owner's command, "
                   "the owner's container.")
@click.option("--metrics-label-cap", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Distinct values kept per opt-in label; the rest are counted as \"other\".")
@click.option("--kernel-mode", type=click.Choice(["auto", "stream", "aggregate"]), default="auto",
              show_default=True,
              help="stream: the kernel sends every state change; aggregate: it folds each connection "
                   "in its map and sends one record when it ends (far less work per connection). auto: "
                   "aggregate for --lifecycles without --record (and without --metrics-labels or a filter "
                   "with --metrics-port), else stream.")
@click.option("--ebpf", "print_ebpf", is_flag=True, help="Print the BPF program for this kernel and exit.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def cli(ctx, hms, seconds, wide, pid, localport, remoteport, ipv4, ipv6, cgroups, containers, duration, lifecycles,
        as_json, strict, max_conns, ring_pages, niceness, record_path, record_host, report_path, poll_interval,
        threshold_pairs, metrics_port, metrics_addr, metrics_labels, metrics_label_cap, kernel_mode, print_ebpf,
        as_csv):
    """Trace TCP connection lifecycles: every state change, with owners and time in each state.

    Run as root. Ctrl-C, SIGTERM or --duration ends the trace and prints a summary to stderr.
    """
    if ctx.invoked_subcommand is not None:
        return
    filters = _filters(pid, localport, remoteport, ipv4, ipv6, cgroups, containers)
    metrics_args = _metrics_args(metrics_port, metrics_addr, metrics_labels, metrics_label_cap)
    settings = prog.Settings(filters, max_conns, ring_pages,
                             _kernel_mode(kernel_mode, lifecycles, record_path, metrics_args.get("metrics"), filters))
    if print_ebpf:
        src = prog.build_source(settings, tracefs.find_tracefs())
        _out(src.text)
        _out("/* cflags: " + " ".join(src.cflags) + " */")
        return
    ctx.exit(trace(settings, niceness=niceness, hms=hms, seconds=seconds, wide=wide, duration=duration,
                   lifecycles=lifecycles, as_json=as_json, as_csv=as_csv, strict=strict, report_path=report_path,
                   record_path=record_path, record_host=_record_host(record_host, record_path),
                   poll_interval=poll_interval,
                   thresholds=_thresholds(threshold_pairs), **metrics_args))


def _kernel_mode(asked: str, lifecycles: bool, record_path, metrics, filters) -> str:
    """What the kernel sends (session.kernel_mode). Aggregated, no transition reaches user
    space until its connection ends: fine for one line per connection, not for the
    per-transition view, a recording of every event, or metrics with opt-in labels or under
    -p/-L/-D/-4/-6 (those count each transition's Lifecycle; without them the kernel counts)."""
    from .session import counts_in_kernel, kernel_mode
    if asked == "auto":
        return kernel_mode(transitions=not lifecycles, recording=bool(record_path), metrics=metrics, filters=filters)
    if asked == "aggregate":
        needs = ("the per-transition view (add --lifecycles)" if not lifecycles else
                 "--record" if record_path else
                 "--metrics-port with --metrics-labels or a filter"
                 if metrics is not None and not counts_in_kernel(metrics, filters) else None)
        if needs:
            raise click.UsageError(f"--kernel-mode aggregate sends one record per connection; {needs} "
                                   "needs every transition: use --kernel-mode stream")
    return asked


def _metrics_args(port, addr, labels, cap) -> dict:
    if port is None:
        if labels:
            raise click.UsageError("--metrics-labels needs --metrics-port")
        return {}
    from .metrics import Metrics
    try:
        m = Metrics(tuple(x.strip() for x in labels.split(",") if x.strip()), cap)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics-labels") from None
    return {"metrics": m, "metrics_port": port, "metrics_addr": addr}


DEFAULT_METRICS_PORT = 9470


@cli.command("serve")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=DEFAULT_METRICS_PORT, show_default=True,
              metavar="PORT", help="Port of the Prometheus endpoint (/metrics).")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address to bind; loopback by default (0.0.0.0 exposes it to the network).")
@click.option("--metrics-labels", default="", metavar="port,comm,container", help="Opt-in labels (capped).")
@click.option("--metrics-label-cap", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Distinct values kept per opt-in label.")
@click.option("--poll-interval", type=Seconds(min=0), default=5.0, show_default=True, metavar="S",
              help="sock_diag look every S seconds: socket counts per state and leak findings (0: off).")
@click.option("--threshold", "threshold_pairs", multiple=True, metavar="NAME=VALUE",
              help="Change a detector threshold, e.g. close_wait_age_s=30 (repeatable; the names are "
                   "listed at the end of `tcplife-trace --help`).")
@_filter_options
@_home_options
@click.option("--duration", type=Seconds(min=0, min_open=True), metavar="S",
              help="Stop after S seconds (default: until SIGTERM).")
@click.option("--record", "record_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also record every event to FILE.")
@click.option("--host", "record_host", metavar="NAME",
              help="The host name the recording's header gives (analyze and fleet analysis know it by "
                   "it; default: this machine's hostname). Needs --record.")
@click.option("--nice", "niceness", type=click.IntRange(-20, 19), default=-5, show_default=True,
              help="Scheduling priority of the consumer.")
@click.option("--max-conns", type=click.IntRange(1024, 4_194_304), default=prog.DEFAULT_MAX_CONNS,
              show_default=True, help="Size of the kernel connection map.")
@click.option("--ring-pages", type=PowerOfTwo(1, 1 << 20), default=prog.DEFAULT_RB_PAGES,
              show_default=True, help="Ring buffer size in pages (a power of two).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="Also write the exit summary as JSON to FILE (`-`: a last line on stdout).")
@click.option("--strict", is_flag=True, help="Exit 1 if any event was lost or any connection went untracked.")
@click.pass_context
def serve_cmd(ctx, metrics_port, metrics_addr, metrics_labels, metrics_label_cap, poll_interval,
              threshold_pairs, pid, localport, remoteport, ipv4, ipv6, cgroups, containers, duration, record_path,
              record_host, niceness, max_conns, ring_pages, report_path, strict):
    """Long-running agent: trace without printing events, serve Prometheus metrics, print
    leak findings to stderr (the journal) as they appear. Stops on SIGTERM.

    Under systemd (JOURNAL_STREAM names stderr) each line carries its syslog priority, so
    `journalctl -u tcplife-trace -p warning` shows the warnings, errors and findings."""
    from . import journal
    journal.use_priorities()
    from .session import kernel_mode
    filters = _filters(pid, localport, remoteport, ipv4, ipv6, cgroups, containers)
    metrics_args = _metrics_args(metrics_port, metrics_addr, metrics_labels, metrics_label_cap)
    # no view: the kernel folds every connection unless a recording or labelled metrics want
    # every transition
    settings = prog.Settings(filters, max_conns, ring_pages,
                             kernel_mode(transitions=False, recording=bool(record_path),
                                         metrics=metrics_args.get("metrics"), filters=filters))
    ctx.exit(trace(settings, niceness=niceness, hms=False, seconds=False, wide=False, duration=duration,
                   lifecycles=False, as_json=False, strict=strict, report_path=report_path, record_path=record_path,
                   record_host=_record_host(record_host, record_path),
                   poll_interval=poll_interval, thresholds=_thresholds(threshold_pairs), quiet=True,
                   **metrics_args))


def _record_host(name: str | None, record_path: str | None) -> str | None:
    """--host: the name a recording's header gives its host (analyze tells hosts apart by it)."""
    if name is not None and not record_path:
        raise click.UsageError("--host names the host in a recording's header: it needs --record FILE")
    return _host_name(name, "--host")


def _set_priority(niceness: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError as e:
        click.echo(f"tcplife-trace: notice: cannot set nice {niceness} ({e.strerror}): the tracer "
                   "competes with the workload as an equal and may lose events under saturation", err=True)


def trace(settings: prog.Settings, *, niceness: int = 0, hms: bool, seconds: bool, wide: bool, duration: float | None,
          lifecycles: bool, as_json: bool, strict: bool, report_path: str | None = None, as_csv: bool = False,
          record_path: str | None = None, record_host: str | None = None, poll_interval: float = 0.0,
          thresholds=None,
          quiet: bool = False, metrics=None, metrics_port: int | None = None,
          metrics_addr: str = "127.0.0.1") -> int:
    if report_path and report_path != "-":
        from . import private_files
        try:  # fail now, not after the incident was traced; the file is made at the end
            private_files.check_replaceable(report_path)
        except OSError as e:
            raise UserError(f"cannot write report {report_path}: {e.strerror}") from None
    if as_json and as_csv:
        raise click.UsageError("--json and -s/--csv exclude each other")
    from .trace_output import TraceOutput
    output = TraceOutput(view="json" if as_json else "csv" if as_csv else "text", lifecycles=lifecycles,
                         wide=wide, hms=hms, seconds=seconds, quiet=quiet,
                         encoding=sys.stdout.encoding or "utf-8", errors=sys.stdout.errors or "strict")
    stop = StopRequest()

    def flush():
        out = getattr(sys.stdout, "buffer", None)
        if out is not None:
            sys.stdout.flush()  # (anything written as text before)
        for data in output.chunks():  # a poll's lines, a bounded piece at a time
            if out is None:
                sys.stdout.write(data.decode(output.encoding, output.errors))
            else:
                out.write(data)
        sys.stdout.flush()

    def on_loss(new, total, why):
        click.echo(f"tcplife-trace: warning: {new} events lost in the kernel ({total} so far): {why}", err=True)

    wall_offset = time.time_ns() - time.monotonic_ns()
    recorder = None
    if record_path:
        from . import recording  # pyarrow only when recording
        try:
            recorder = recording.RecordingWriter(
                record_path, recording.header(settings.filters, wall_offset, host=record_host))
        except recording.RecordingError as e:
            raise UserError(str(e)) from None
    def say_notice(text):
        click.echo(f"tcplife-trace: notice: {text}", err=True)

    def say_finding(f):
        from .render import findings as findings_view
        click.echo(f"tcplife-trace: {findings_view.one_line(f)}", err=True)

    def say_recorder_failed(text):
        click.echo(f"tcplife-trace: error: {text}; free space or record elsewhere", err=True)

    from .session import Session
    session = Session(settings, poll_interval_s=poll_interval, thresholds=thresholds, metrics=metrics,
                      recorder=recorder, wall_offset_ns=wall_offset, on_loss=on_loss,
                      on_finding=say_finding, on_notice=say_notice, on_recorder_failed=say_recorder_failed,
                      **output.session_callbacks(settings.filters))
    output.attach(session)
    if metrics is not None:
        try:
            session.serve_metrics(metrics_port, metrics_addr)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {e.strerror}; "
                            "choose another --metrics-port or --metrics-addr") from None
    _set_priority(niceness)
    click.echo(f"tcplife-trace: tracing TCP state changes ({len(session.live.program.source.tracepoints)} "
               f"tracepoints, ready in {session.live.startup_s:.2f} s)"
               + (f", metrics on http://{metrics_addr}:{metrics_port}/metrics" if metrics is not None else "")
               + (f" for {duration:g} s" if duration else "; Ctrl-C to end"), err=True)
    session.seed()  # the detectors' first look (pumped), then the notices
    header = output.header()
    if header is not None:
        _out(header)
    try:
        report = session.run(duration, should_stop=lambda: stop.requested, after_poll=flush)
        output.still_open()  # (their health from the last look at the sockets)
        flush()
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, still summarise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        report = session.stop()
    if output.unmatched:
        click.echo(f"tcplife-trace: warning: {output.unmatched} transitions of sockets the full connection map "
                   "had no entry for were printed without their owner and time in the old state (the "
                   "tracker's line for them was not found)", err=True)
    click.echo(summary_text(report), err=True)
    if as_json:
        click.echo(json.dumps({"type": "summary", **report}), err=True)
    if report_path == "-":  # stdout: the records' reader gets the summary as their last line
        _out(json.dumps({"type": "summary", **report}))
        sys.stdout.flush()
    elif report_path:
        try:  # a new 0600 file renamed over the name: a planted symlink is replaced, not followed
            private_files.replace(report_path, json.dumps(report, indent=1).encode())
        except OSError as e:
            click.echo(f"tcplife-trace: error: cannot write report {report_path}: {e.strerror}", err=True)
            return EXIT_ERROR
    if strict and session.degraded():
        click.echo("tcplife-trace: error: --strict: events were lost or connections went untracked "
                   f"({', '.join(losses.degraded_by(report))}; see the summary above)", err=True)
        return EXIT_DEGRADED
    if recorder is not None and recorder.failed:
        click.echo(f"tcplife-trace: error: {recorder.failed}", err=True)
        return EXIT_DEGRADED
    return EXIT_OK


@cli.command("analyze")
@click.argument("files", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="table: a report; json: every frame; csv: the lifecycles.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write each frame as Parquet into DIR.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the report as one self-contained HTML page (plots inline, nothing fetched "
                   "when opened; one section per host).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write the report's plots into DIR as PNG and SVG files.")
@_filter_options
@click.option("--all-recorded", is_flag=True,
              help="Every connection that reached the file: without it, each recording shows only what "
                   "the filters it was recorded with keep (as the live trace did), and -p/-L/-D/-4/-6 narrow "
                   "that.")
@click.option("--since", metavar="TIME", help="Only from this ISO-8601 time on (e.g. 2026-11-22T19:00:00Z).")
@click.option("--until", metavar="TIME", help="Only up to this ISO-8601 time.")
@click.option("--threshold", "threshold_pairs", multiple=True, metavar="NAME=VALUE",
              help="Change a detector threshold, e.g. close_wait_age_s=30 (repeatable).")
@click.option("--engine", type=click.Choice(["pandas", "dask"]), default="pandas", show_default=True,
              help="dask: every host file is a partition of a Dask DataFrame (a local cluster, or "
                   "--scheduler); for recordings from many hosts.")
@click.option("--scheduler", metavar="ADDRESS", help="An existing Dask scheduler, e.g. tcp://10.0.0.5:8786.")
@click.option("--workers", type=click.IntRange(1, 1024), metavar="N",
              help="Worker processes of the local Dask cluster (default: one per CPU).")
@click.option("--date", "capture_date", metavar="YYYY-MM-DD",
              help="tcpstates text: the day of the capture's first line (default: the day of the file's "
                   "modification time, said in a warning).")
@click.option("--tz", "capture_tz", metavar="ZONE",
              help="tcpstates text: the time zone of its HH:MM:SS, e.g. UTC, Europe/Paris, +05:30 "
                   "(default: this machine's, said in a warning).")
@click.option("--host", "capture_host", metavar="NAME",
              help="tcpstates text: the host it was captured on (default: unknown).")
def analyze(files, fmt, export_dir, pid, localport, remoteport, ipv4, ipv6, all_recorded, since, until,
            threshold_pairs, engine, scheduler, workers, capture_date, capture_tz, capture_host, html_path=None,
            plots_dir=None):
    """Analyse recordings made with --record FILE.

    FILES are recordings, directories (searched for *.arrow) or globs. Files of one host are
    analysed as one; files of several hosts (or --engine dask) per host, with a host column.
    """
    import pandas as pd

    from . import analysis_report
    from .recording import RecordingError, load

    def when(value, name):
        if not value:
            return None
        try:
            ts = pd.Timestamp(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint=name) from None
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts

    filters = _filters(pid, localport, remoteport, ipv4, ipv6)
    start, stop = when(since, "--since"), when(until, "--until")
    thresholds = _thresholds(threshold_pairs)
    if scheduler and engine != "dask":
        raise click.UsageError("--scheduler needs --engine dask")
    text_import = _text_import(capture_date, capture_tz, capture_host)
    if export_dir:
        _export_check(export_dir)  # now, not after minutes of analysis
    from . import fleet, progress
    try:
        paths = fleet.expand(files)
        if text_import is not None:
            from .tcpstates_import import looks_like_tcpstates
            if not any(looks_like_tcpstates(p) for p in paths):
                raise click.UsageError("--date, --tz and --host describe a tcpstates text capture, and none "
                                       "of the files is one")
        if engine == "dask" or len(fleet.hosts(paths, text_import)) > 1:
            with progress.bar(f"analysing {len(paths)} file{'s' if len(paths) > 1 else ''}" + (" on Dask" if engine == "dask" else ""),
                              total=len(paths)) as update:  # (Dask: its partitions, once known)
                out = fleet.analyze(paths, engine, scheduler=scheduler, thresholds=thresholds, filters=filters,
                                    since=start, until=stop, workers=workers, transitions=bool(export_dir),
                                    text_import=text_import, all_recorded=all_recorded, progress=update)
            for w in out["warnings"]:
                click.echo(f"tcplife-trace: warning: {w}", err=True)
            _visual_reports(paths, html_path, plots_dir, filters=filters, since=start, until=stop,
                            thresholds=thresholds, text_import=text_import, all_recorded=all_recorded)
            _fleet_output(out, fmt, export_dir)
            return
        with progress.bar(f"loading {len(paths)} file{'s' if len(paths) > 1 else ''}"):
            rec = load(paths, text_import, all_recorded)
        for w in rec.warnings:
            click.echo(f"tcplife-trace: warning: {w}", err=True)
        with progress.bar("computing the frames"):
            frames = analysis_report.frames(rec, filters, start, stop, thresholds)
        _visual_reports(paths, html_path, plots_dir, rec=rec, frames=frames, filters=filters, since=start,
                        until=stop, thresholds=thresholds)
    except RecordingError as e:
        raise UserError(str(e)) from None
    if export_dir:
        _export(frames, export_dir)
    if fmt == "table":
        _out(analysis_report.text(rec, frames))
    elif fmt == "csv":
        sys.stdout.write(frames["lifecycles"].to_csv(index=False))
    else:
        docs = {name: df.to_json(orient="records", date_format="iso")  # pandas writes them; spliced in
                for name, df in frames.items() if name != "transitions"}
        docs["recordings"] = json.dumps([{"header": h, "end": e, "filters_applied": f.describe()}
                                         for h, e, f in zip(rec.headers, rec.ends, rec.applied_filters, strict=True)])
        _out(_json_object(docs))


def _text_import(date: str | None, tz: str | None, host: str | None):
    """analyze --date/--tz/--host as a tcpstates_import.TextImport; None when none is given."""
    if date is None and tz is None and host is None:
        return None
    import datetime as dt

    from .tcpstates_import import TextImport
    try:
        day = dt.date.fromisoformat(date) if date is not None else None
    except ValueError:
        raise click.BadParameter(f"{date!r} is not a day: give YYYY-MM-DD", param_hint="--date") from None
    try:
        zone = TextImport.zone(tz) if tz is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tz") from None
    return TextImport(day, zone, _host_name(host, "--host"))


def _host_name(name: str | None, flag: str) -> str | None:
    if name is None:
        return None
    name = name.strip()
    if not name or len(name) > 255 or not name.isprintable():
        raise click.BadParameter(f"{name!r} is not a host name (1-255 printable characters)", param_hint=flag)
    return name


def _visual_reports(paths, html_path, plots_dir, rec=None, frames=None, **kw) -> None:
    """--html and --plots: the report page, the plots as files (report_html). With rec and
    frames (one host), from those; else each host's files loaded in turn."""
    if not html_path and not plots_dir:
        return
    try:
        from . import report_html
    except ImportError as e:
        raise UserError(f"--html and --plots need matplotlib ({e}): pip install matplotlib") from None
    from . import progress
    written: list[str] = []
    try:  # (with both, the plots are drawn once, for the page and the files)
        with progress.bar("drawing the report"):
            if html_path:
                page = (report_html.render(rec, frames, plots_dir=plots_dir, written=written, **kw)
                        if rec is not None else
                        report_html.render_paths(paths, plots_dir=plots_dir, written=written, **kw))
            else:
                written = (report_html.plots(rec, plots_dir, frames, **kw) if rec is not None
                           else report_html.plots_paths(paths, plots_dir, **kw))
    except OSError as e:
        raise UserError(f"cannot write plots into {plots_dir}: {e.strerror}; give another --plots DIR") from None
    if html_path:
        try:
            report_html.write(html_path, page)
        except OSError as e:
            raise UserError(f"cannot write {html_path}: {e.strerror}; give another --html FILE") from None
        click.echo(f"tcplife-trace: wrote {html_path}", err=True)
    if plots_dir:
        click.echo(f"tcplife-trace: wrote {len(written)} plot files (PNG and SVG) to {plots_dir}" if written
                   else f"tcplife-trace: no connections to plot: nothing written to {plots_dir}", err=True)


def _export_check(export_dir: str) -> None:
    """Make --export's directory now (not after minutes of analysis); UserError if it cannot be
    made or written."""
    try:
        os.makedirs(export_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot export into {export_dir}: {e.strerror or e}; "
                        "give --export a directory you can write") from None
    if not os.access(export_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot export into {export_dir}: Permission denied; "
                        "give --export a directory you can write")


def _export(frames: dict, export_dir: str, **kw) -> None:
    """analyze --export: each frame as Parquet into export_dir; a directory that cannot be made
    or written is one line (exit 2), not a traceback."""
    from . import analysis_report
    try:
        for path in analysis_report.export(frames, export_dir, **kw):
            click.echo(f"tcplife-trace: wrote {path}", err=True)
    except OSError as e:
        where = f"{e.filename}: " if e.filename and e.filename != export_dir else ""
        raise UserError(f"cannot export into {export_dir}: {where}{e.strerror or e}; "
                        "give --export a directory you can write") from None


def _fleet_output(out: dict, fmt: str, export_dir: str | None) -> None:
    from . import analysis_report, fleet
    frames = {k: out[k] for k in (*fleet.FRAMES, "summary")}
    if export_dir:
        _export({**frames, **{k: out[k] for k in fleet.ALL_FRAMES if k in out}}, export_dir, host=True)
    if fmt == "table":
        _out(fleet.text(out))
    elif fmt == "csv":
        sys.stdout.write(out["lifecycles"].to_csv(index=False))
    else:
        docs = {name: (df.reset_index() if name == "summary" else df).to_json(orient="records", date_format="iso")
                for name, df in frames.items()}
        docs["files"] = json.dumps(out["files"])
        _out(_json_object(docs))


def _json_object(members: dict[str, str]) -> str:
    """{"name": <JSON text>, ...} from members already serialized (frames written by pandas are
    not parsed back only to be written again)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in members.items()) + "}"


def _thresholds(pairs: tuple[str, ...]):
    """Thresholds with these NAME=VALUE changes; None (the defaults) without any, which keeps
    pandas, and the detectors' memory, out of a live trace run with --poll-interval 0."""
    if not pairs:
        return None
    from tcplife_trace.analysis.leaks import Thresholds
    t = Thresholds()
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if name not in Thresholds.names():
            raise click.BadParameter(f"unknown threshold {name!r}; known: {', '.join(Thresholds.names())}",
                                     param_hint="--threshold")
        kind = type(getattr(t, name))
        try:
            v = kind(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: {name} takes a {kind.__name__}",
                                     param_hint="--threshold") from None
        if not math.isfinite(v) or v < 0:  # (every threshold is an age, a count or a rate)
            raise click.BadParameter(f"{pair!r}: {name} takes a finite {kind.__name__} >= 0",
                                     param_hint="--threshold")
        setattr(t, name, v)
    return t


_THRESHOLD_HELP = ("Change a detector threshold, e.g. close_wait_age_s=30 (repeatable; names in the "
                   "README).")


@cli.command("doctor")
@click.option("--duration", type=Seconds(min=0), default=10.0, show_default=True, metavar="S",
              help="How long to trace after the first snapshot (0: judge that one snapshot at once).")
@click.option("--interval", type=Seconds(min=0), default=2.0, show_default=True, metavar="S",
              help="Snapshot every S seconds while tracing (0: only at start and end).")
@click.option("--fail-on", type=click.Choice(["info", "warning", "critical"]), default="warning",
              show_default=True, help="Exit 1 when a finding still present at the end is at least this severe.")
@click.option("--threshold", "threshold_pairs", multiple=True, metavar="NAME=VALUE", help=_THRESHOLD_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_filter_options
@_home_options
@click.pass_context
@click.option("--record", "record_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also record every event and snapshot to FILE, for `tcplife-trace analyze FILE` later.")
def doctor_cmd(ctx, duration, interval, fail_on, threshold_pairs, as_json, pid, localport, remoteport, ipv4,
               ipv6, cgroups, containers, record_path):
    """Snapshot every TCP socket (all namespaces), trace for a while, report leaks and piles.

    Exit status: 0 healthy, 1 findings at or above --fail-on, 2 could not run.
    """
    from . import doctor
    from .render import findings as findings_view
    filters = _filters(pid, localport, remoteport, ipv4, ipv6, cgroups, containers)
    thresholds = _thresholds(threshold_pairs)
    stop = StopRequest()

    def announce(f):  # (above the countdown, on a terminal)
        from . import progress
        progress.say(f"tcplife-trace: {findings_view.one_line(f)}")

    def ready():  # once attached: a run that cannot start says only why
        click.echo("tcplife-trace doctor: snapshot taken, " + (f"tracing for {duration:g} s" if duration
                                                                 else "judged at once (--duration 0)"), err=True)
    recorder, wall_offset = None, time.time_ns() - time.monotonic_ns()
    if record_path:
        if not duration:
            raise click.UsageError("--record needs a trace: give --duration S (more than 0)")
        from . import recording
        try:
            recorder = recording.RecordingWriter(record_path, recording.header(filters, wall_offset))
        except recording.RecordingError as e:
            raise UserError(str(e)) from None
    from . import progress
    try:  # a recording needs every transition; without one the kernel folds each connection
        with progress.countdown("tcplife-trace doctor: tracing", duration) as tick:
            report = doctor.run(prog.Settings(filters, mode="stream" if recorder else "aggregate"),
                                duration_s=duration, interval_s=interval, thresholds=thresholds,
                                on_finding=None if as_json else announce, should_stop=lambda: stop.requested,
                                on_ready=ready, filters=filters, recorder=recorder, wall_offset_ns=wall_offset,
                                on_tick=tick)
    except BaseException:
        if recorder is not None and not recorder.written:
            recorder.discard()  # it never started: leave no empty file behind
        raise
    _out(findings_view.report_json(report) if as_json else findings_view.report_text(report))
    rec = (report.get("trace") or {}).get("recording")
    if rec:
        from . import invocation
        click.echo(f"tcplife-trace doctor: recorded {rec['events']} events and {rec['socket_snapshots']} socket "
                   f"snapshots to {rec['path']}; read it with: {invocation.command()} analyze {rec['path']}",
                   err=True)
        if rec.get("failed"):
            click.echo(f"tcplife-trace: error: {rec['failed']}", err=True)
    ctx.exit(doctor.exit_status(report["findings"], fail_on))


@cli.command("top")
@_filter_options
@click.option("--duration", type=Seconds(min=0, min_open=True), metavar="S", help="Stop after S seconds.")
@click.option("--refresh", type=Seconds(min=0.1), default=1.0, show_default=True, metavar="S",
              help="Redraw (or, stdout not a terminal, print) every S seconds.")
@click.option("--poll-interval", type=Seconds(min=0), default=2.0, show_default=True, metavar="S",
              help="Look at every socket (all namespaces) every S seconds: states and findings (0: off).")
@click.option("--record", "record_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also record every event and snapshot to FILE.")
@click.option("--threshold", "threshold_pairs", multiple=True, metavar="NAME=VALUE", help=_THRESHOLD_HELP)
def top_cmd(pid, localport, remoteport, ipv4, ipv6, duration, refresh, poll_interval, record_path, threshold_pairs):
    """Live full-screen view: sockets per state, new and ended connections, top peers, ports and
    processes, findings. Keys: q quit, p pause, s sort, g group, / filter. Stdout not a terminal:
    a plain print every --refresh seconds."""
    from . import recording, top
    try:
        report, notices = top.run(prog.Settings(_filters(pid, localport, remoteport, ipv4, ipv6)), duration=duration,
                                  refresh_s=refresh, poll_interval=poll_interval, record_path=record_path,
                                  thresholds=_thresholds(threshold_pairs))
    except recording.RecordingError as e:
        raise UserError(str(e)) from None
    for notice in notices:
        click.echo(f"tcplife-trace: notice: {notice}", err=True)
    click.echo(summary_text(report), err=True)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="tcplife-trace", standalone_mode=False)
        return rv if isinstance(rv, int) else EXIT_OK
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        return 130
    except click.ClickException as e:
        click.echo(f"tcplife-trace: error: {e.format_message()} (see --help)", err=True)
        return EXIT_ERROR
    except (prog.ProgramError, BccMissing, tracefs.TracefsError, UserError) as e:
        click.echo(f"tcplife-trace: error: {e}", err=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
