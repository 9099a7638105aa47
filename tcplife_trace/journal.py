"""Severities for the journal: under systemd, stderr lines that start with <N> are logged at
syslog priority N (sd-daemon(3), SyslogLevelPrefix=yes, the default), so that
`journalctl -p warning` shows the warnings and findings and nothing else.

systemd tells a service its stderr is the journal with JOURNAL_STREAM=DEVICE:INODE; when
that is not stderr (a terminal, a pipe, a file), lines are left as they are.
"""
from __future__ import annotations

import io
import os
import re
import sys

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)

# "tcplife-trace: error: ...", "tcplife-trace: CRITICAL close_wait_leak: ..." (findings_view.one_line)
_LEVEL = re.compile(r"^tcplife-trace(?: [a-z]+)?: (error|warning|notice|CRITICAL|WARNING|INFO)\b")
_PRIORITY = {"error": ERR, "warning": WARNING, "notice": NOTICE,
             "CRITICAL": CRIT, "WARNING": WARNING, "INFO": INFO}


def priority(line: str) -> int:
    """The syslog priority of one line the tool writes to stderr."""
    m = _LEVEL.match(line)
    return _PRIORITY[m.group(1)] if m else INFO


def stderr_is_journal(stream=None) -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class PriorityPrefixed(io.TextIOBase):
    """A text stream that writes each line to `raw` as "<N>line" (continuation lines of a
    multi-line message get the priority of its first line)."""

    def __init__(self, raw):
        self.raw = raw
        self._partial = ""
        self._level = INFO

    def write(self, text: str) -> int:
        data = self._partial + text
        *lines, self._partial = data.split("\n")
        out = []
        for line in lines:
            if line.startswith("tcplife-trace"):
                self._level = priority(line)
            elif not line.startswith((" ", "\t")):
                self._level = INFO
            out.append(f"<{self._level}>{line}\n")
        if out:
            self.raw.write("".join(out))
            self.raw.flush()
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return False


def use_priorities() -> bool:
    """From now on, prefix stderr lines with their priority if stderr is the journal."""
    if isinstance(sys.stderr, PriorityPrefixed) or not stderr_is_journal():
        return False
    sys.stderr = PriorityPrefixed(sys.stderr)
    return True
