"""Progress bars (tcplife_trace/progress.py): drawn on stderr when it is a terminal (a real
pseudo-terminal here), nothing at all when it is not; doctor's countdown on the real kernel."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tcplife_trace import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, ".venv", "bin", "tcplife-trace")

SCRIPT = r'''
import sys, time
from tcplife_trace import progress
with progress.bar("loading 3 files", total=3) as update:
    for i in range(3):
        time.sleep(0.3); update(i + 1)
with progress.countdown("tracing", 1.0) as tick:
    progress.say("a finding, above the bar")
    for left in (1.0, 0.6, 0.2):
        tick(left); time.sleep(0.3)
print("the report")
'''


def on_a_terminal(argv: list[str], timeout: float = 60.0) -> tuple[str, str, int]:
    """Run argv with stderr on a pseudo-terminal and stdout on a pipe: (stdout, what the terminal got, rc)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "100", "TERM": "xterm"})
    os.close(slave)
    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif p.poll() is not None:
            break
    out = p.stdout.read().decode()
    p.wait(timeout=10)
    os.close(master)
    return out, seen.decode("utf-8", "replace"), p.returncode


def test_a_bar_and_a_countdown_on_a_terminal_and_stdout_untouched():
    out, term, rc = on_a_terminal([sys.executable, "-c", SCRIPT])
    assert rc == 0, term
    assert out == "the report\n"  # stdout is not the bar's: a pipe gets the output only
    assert "loading 3 files" in term and "3/3" in term and "━" in term, term
    assert "s left" in term and "a finding, above the bar" in term, term


def test_nothing_drawn_when_stderr_is_not_a_terminal(capfd):
    with progress.bar("loading", total=3) as update:
        update(1)
        update(3, description="done")
    with progress.countdown("tracing", 2.0) as tick:
        tick(1.0)
        progress.say("a line")
        tick(0.0)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "a line\n")


@pytest.mark.privileged
def test_doctor_counts_down_on_a_terminal_and_says_nothing_more_off_it():
    out, term, rc = on_a_terminal([TOOL, "doctor", "--duration", "2", "--interval", "0", "-L", "1"])
    assert rc == 0, term
    assert "snapshot taken, tracing for 2 s" in term and "s left" in term, term
    assert "Traceback" not in term and "\ntraced " in out and "s left" not in out, out
    plain = subprocess.run([TOOL, "doctor", "--duration", "1", "--interval", "0", "-L", "1"], capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 0 and "s left" not in plain.stderr and "\x1b" not in plain.stderr, plain.stderr
