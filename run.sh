#!/bin/sh
# The two commands of the README (and the benchmark):
#   sudo ./run.sh trace [tcplife-trace flags]   set up if needed, then trace live
#   sudo ./run.sh test  [pytest args]           set up if needed (with the test tools: promtool), then run every test, privileged included
#   sudo ./run.sh bench [bench flags]           set up with peer tools, then run bench/churn.py
set -eu
ROOT=$(cd "$(dirname "$0")" && pwd)
VENV=${TCPLIFE_TRACE_VENV:-$ROOT/.venv}
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    trace)
        "$ROOT/scripts/provision.sh"
        exec "$VENV/bin/tcplife-trace" "$@" ;;
    test)
        "$ROOT/scripts/provision.sh" --test-tools
        cd "$ROOT"
        # privileged tests fail (not skip) if they cannot load the real BPF program
        TCPLIFE_TRACE_REQUIRE_PRIVILEGED=1 exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests "$@" ;;
    bench)
        "$ROOT/scripts/provision.sh" --with-peers
        exec "$VENV/bin/python" "$ROOT/bench/churn.py" "$@" ;;
    *)
        echo "usage: sudo ./run.sh trace [flags] | test [pytest args] | bench [flags]" >&2
        exit 2 ;;
esac
