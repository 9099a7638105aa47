"""Runs tcplife-trace's main() on argv lists read from stdin (one JSON list a line) and answers
one JSON object a line: exit status, stderr, whether a traceback escaped, whether it hung.

The fuzz test starts one worker (as an unprivileged user when it runs as root, so that any
command line the parser accepts ends at the privilege check, without BPF) and feeds it its
cases: pandas, pyarrow and click are imported once, not once a case."""
import contextlib
import io
import json
import os
import signal
import sys
import traceback

CASE_S = 10  # a case that takes longer has hung


class Hung(BaseException):
    pass


def _alarm(signum, frame):
    raise Hung()


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the CLI writes to fd 1 directly
    from tcplife_trace.cli import main as cli_main
    signal.signal(signal.SIGALRM, _alarm)
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        argv = json.loads(line)
        err, std = io.StringIO(), io.StringIO()
        result = {"rc": None, "traceback": None, "hung": False}
        signal.alarm(CASE_S)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                result["rc"] = cli_main(argv)
        except Hung:
            result["hung"] = True
        except BaseException:  # noqa: BLE001 - what escaped main() is what a user would see
            result["traceback"] = traceback.format_exc()
        finally:
            signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (the live command's handlers)
            signal.signal(sig, signal.SIG_DFL)
        result["stderr"] = err.getvalue()
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
