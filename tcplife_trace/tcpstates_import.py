"""Import text captured with bcc's `tcpstates -T -w` or libbpf-tools' `tcpstates -T -w`.

Each line becomes a state event, so the same frames can be built. What such a
capture does not have stays unknown: the owner (its PID is whatever task the
kernel ran, tcplife-trace's cur_pid), netns, uid, byte counts, resets, errno.
Times: the line's HH:MM:SS for each connection's first transition, then the MS
column (time in the old state) for the exact spacing of the following ones. The
capture says neither its day, nor its time zone, nor its host: TextImport gives them
(analyze --date, --tz, --host); what is not given is assumed (the day of the file's
modification time, this machine's time zone) or unknown (the host), and said.
A new connection starts at each birth (CLOSE->SYN_SENT, CLOSE->LISTEN,
LISTEN->SYN_RECV), so a reused socket address does not merge two connections.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import socket
from dataclasses import dataclass

from tcplife_trace.analysis.lifecycle import BIRTHS
from tcplife_trace.probes.event_layout import EventKind, Flag
from tcplife_trace.probes.tcp_states import TcpState

UNKNOWN = ("owner (the PID column is the task the kernel ran)", "netns", "uid", "bytes",
           "resets", "errno", "sub-second start times")
_STATES = {s.name: int(s) for s in TcpState}
_BIRTHS = {(TcpState(a).name, TcpState(b).name) for a, b in BIRTHS}
_HMS = re.compile(r"^\d\d:\d\d:\d\d$")


@dataclass(frozen=True)
class TextImport:
    """What a tcpstates text capture does not say: the day of its first line, the time zone
    its HH:MM:SS are in, the host it was captured on. None: not given."""
    date: dt.date | None = None
    tz: dt.tzinfo | None = None
    host: str | None = None

    @staticmethod
    def zone(text: str) -> dt.tzinfo:
        """--tz: UTC, an IANA name (Europe/Paris) or an offset (+05:30); ValueError if none."""
        m = re.fullmatch(r"(?:UTC)?([+-])(\d\d):?(\d\d)", text.strip())
        if m:
            delta = dt.timedelta(hours=int(m[2]), minutes=int(m[3]))
            return dt.timezone(-delta if m[1] == "-" else delta)
        if text.strip().upper() in ("UTC", "Z"):
            return dt.timezone.utc
        import zoneinfo
        try:
            return zoneinfo.ZoneInfo(text.strip())
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{text!r} is not a time zone: give UTC, a name like Europe/Paris, "
                             "or an offset like +05:30") from None


class _Clock:
    """HH:MM:SS of the lines -> wall time. A time of day more than 12 h before the previous
    line's is the next day (the capture crossed midnight; out-of-order lines from per-CPU
    buffers are milliseconds apart). The day is the given one for the first line, else that of
    the file's modification time for the last line (tcpstates wrote it last)."""

    def __init__(self, path: str, opts: TextImport | None):
        opts = opts or TextImport()
        self.given_day, self.given_tz = opts.date is not None, opts.tz is not None
        self.tz = opts.tz  # None: this machine's zone, with its summer time rules
        self.mtime_day = dt.datetime.fromtimestamp(os.path.getmtime(path), self.tz).date()
        self.days, self._last = 0, None  # midnights crossed so far; the previous line's second of the day
        self._first_day = opts.date

    def day_of(self, hms: dt.time) -> int:
        """The line's day, counted from the first line's."""
        sec = hms.hour * 3600 + hms.minute * 60 + hms.second
        if self._last is not None and sec < self._last - 12 * 3600:
            self.days += 1
        self._last = sec
        return self.days

    @property
    def first_day(self) -> dt.date:
        return self._first_day or self.mtime_day - dt.timedelta(days=self.days)

    def wall_ns(self, day: int, hms: dt.time) -> int:
        when = dt.datetime.combine(self.first_day + dt.timedelta(days=day), hms, tzinfo=self.tz)
        if self.tz is None:
            when = when.astimezone()
        return int(when.timestamp()) * 1_000_000_000

    def assumed(self) -> dict:
        """What the import took the day and zone to be, and where from (for the header)."""
        noon = dt.datetime.combine(self.first_day, dt.time(12), tzinfo=self.tz)
        noon = noon.astimezone() if self.tz is None else noon
        off = noon.utcoffset()
        sign, off = ("-", -off) if off < dt.timedelta(0) else ("+", off)
        name = str(self.tz) if self.tz is not None else noon.tzname()
        return {"first_day": self.first_day.isoformat(), "midnights_crossed": self.days,
                "day_from": "--date" if self.given_day else "the file's modification time",
                "tz": f"{name} (UTC{sign}{int(off.total_seconds()) // 3600:02d}:"
                      f"{int(off.total_seconds()) % 3600 // 60:02d})",
                "tz_from": "--tz" if self.given_tz else "this machine's time zone"}


def looks_like_tcpstates(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    return "SKADDR" in first and "OLDSTATE" in first and "NEWSTATE" in first


def _raw(family: int, text: str) -> bytes:
    if family == 4:
        return socket.inet_pton(socket.AF_INET, text) + b"\0" * 12
    return socket.inet_pton(socket.AF_INET6, text)


def _line(tok: list[str], has_ip: bool, clock: _Clock) -> dict:
    i = tok.index("->")
    if not _HMS.match(tok[0]):
        raise ValueError("no HH:MM:SS time (capture with -T)")
    laddr = tok[i - 5]
    hms = dt.time.fromisoformat(tok[0])
    rec = {"old": tok[i - 1], "new": tok[i + 1], "ms": float(tok[i + 2]),
           "laddr": laddr, "lport": int(tok[i - 4]), "raddr": tok[i - 3], "rport": int(tok[i - 2]),
           "skaddr": tok[1], "pid": int(tok[2]),
           "comm": " ".join(tok[3:i - 6 if has_ip else i - 5]),
           "family": int(tok[i - 6]) if has_ip else (6 if ":" in laddr else 4),
           "hms": hms}
    # every value as the event's field will hold it, or the line is not understood (ValueError):
    # a SKADDR that is not hex, an address that is not one, port 70000, MS nan
    rec["sk"] = int(rec["skaddr"], 16)
    if not 0 <= rec["sk"] < 1 << 64 or not 0 <= rec["pid"] < 1 << 32:
        raise ValueError("SKADDR or PID out of range")
    if not (0 <= rec["lport"] <= 65535 and 0 <= rec["rport"] <= 65535):
        raise ValueError("port out of range")
    if not (math.isfinite(rec["ms"]) and 0 <= rec["ms"] < 1e12):
        raise ValueError("MS is not a duration")
    if rec["family"] not in (4, 6):
        raise ValueError("IP is neither 4 nor 6")
    try:
        rec["lraw"], rec["rraw"] = _raw(rec["family"], laddr), _raw(rec["family"], rec["raddr"])
    except OSError:
        raise ValueError("an address that is not one") from None
    # the day last: a line refused above must not move the clock past a midnight
    rec["day"] = clock.day_of(hms)
    return rec


def _chains(lines: list[dict]) -> list[list[dict]]:
    """One socket address's lines -> connections, each in state order.

    Per-CPU perf buffers deliver a socket's events out of order (a CLOSE_WAIT->LAST_ACK
    before the ESTABLISHED->CLOSE_WAIT that led to it), so each connection is rebuilt by
    following its states: from a birth (or the first line), the next line whose old
    state is where the previous one led."""
    pending = list(lines)
    out = []
    while pending:
        start = next((ln for ln in pending if (ln["old"], ln["new"]) in _BIRTHS), pending[0])
        pending.remove(start)
        chain, state = [start], start["new"]
        while True:
            # a no-op (FIN_WAIT1 -> FIN_WAIT1 after shutdown) comes before leaving the state
            nxt = next((ln for ln in pending if ln["old"] == state == ln["new"]), None) or \
                next((ln for ln in pending if ln["old"] == state and (ln["old"], ln["new"]) not in _BIRTHS),
                     None)
            if nxt is None:
                break
            pending.remove(nxt)
            chain.append(nxt)
            state = nxt["new"]
        out.append(chain)
    return out


def parse(path: str, opts: TextImport | None = None) -> tuple[list[tuple], int, list[str], dict]:
    """(events in `Ev` order, mono_to_wall offset, warnings, what was assumed of the capture's
    day and time zone)."""
    with open(path, errors="replace") as f:
        text = f.read().splitlines()
    clock = _Clock(path, opts)
    by_skaddr: dict[str, list[dict]] = {}
    has_ip, bad = False, 0
    for ln in text:
        tok = ln.split()
        if not tok:
            continue
        if "OLDSTATE" in tok:
            has_ip = "IP" in tok
            continue
        try:
            rec = _line(tok, has_ip, clock)
            if rec["old"] not in _STATES or rec["new"] not in _STATES:
                raise KeyError(rec["old"])
            by_skaddr.setdefault(rec["skaddr"], []).append(rec)
        except (ValueError, IndexError, KeyError):
            bad += 1
    events, gen = [], 0
    for lines in by_skaddr.values():
        for chain in _chains(lines):
            gen += 1
            first = chain[0]
            born = (first["old"], first["new"]) in _BIRTHS
            ts = clock.wall_ns(first["day"], first["hms"])
            for seq, ln in enumerate(chain):
                if seq:
                    ts += int(ln["ms"] * 1e6)
                flags = 0 if born or seq else int(Flag.BIRTH_UNSEEN)
                fam = ln["family"]
                events.append((ts, ln["sk"], gen, 0, 0, 0, ln["pid"], ln["pid"], 0, 0,
                               ln["lport"], ln["rport"], socket.AF_INET if fam == 4 else socket.AF_INET6,
                               int(EventKind.STATE), _STATES[ln["old"]], _STATES[ln["new"]], flags,
                               ln["lraw"], ln["rraw"],
                               ln["comm"].encode()[:16].ljust(16, b"\0"), seq % 65536))
    events.sort(key=lambda ev: ev[0])
    warnings = []
    if bad:
        warnings.append(f"{path}: {bad} line(s) not understood as tcpstates -T -w output, skipped")
    warnings.append(f"{path}: imported from tcpstates text; unknown: {', '.join(UNKNOWN)}")
    assumed = clock.assumed()
    said = []
    if not clock.given_day:
        said.append(f"its first line on {assumed['first_day']} (from the file's modification time"
                    + (f", {clock.days} midnight(s) crossed" if clock.days else "") + "; give --date YYYY-MM-DD)")
    if not clock.given_tz:
        said.append(f"its times in this machine's time zone, {assumed['tz']} (give --tz)")
    if not (opts and opts.host):
        said.append("its host unknown (give --host NAME)")
    if said:
        warnings.append(f"{path}: tcpstates text does not say when or where it was captured: assumed "
                        + ", ".join(said))
    return events, 0, warnings, assumed
