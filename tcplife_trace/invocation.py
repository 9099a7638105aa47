"""How the user can type this tool again, for hints such as "read it with: ... analyze FILE"."""
from __future__ import annotations

import os
import shlex
import shutil
import sys

NAME = "tcplife-trace"


def command() -> str:
    """`tcplife-trace` when PATH leads to this very program (the setup's /usr/local/sbin link,
    a pip or pipx install), else the path it was started by, or `python -m tcplife_trace.cli`."""
    me = sys.argv[0] if sys.argv and sys.argv[0] else ""
    found = shutil.which(NAME)
    if os.path.basename(me) == NAME:
        if found and os.path.realpath(found) == os.path.realpath(me):
            return NAME
        return shlex.quote(os.path.abspath(me))
    if found:
        return NAME
    return f"{shlex.quote(sys.executable)} -m tcplife_trace.cli"
