#!/bin/sh
# Provision a Debian/Ubuntu machine for tcplife-trace: system packages, tracefs, a venv.
# Idempotent and quiet when there is nothing to do. Used by ./run.sh, .ci/run and the Vagrantfile.
#   scripts/provision.sh [--with-peers]    (--with-peers: also bcc/libbpf-tools/bpftrace for bench/)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${TCPLIFE_TRACE_VENV:-$ROOT/.venv}
say() { echo "provision: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "run as root (sudo): packages are installed with apt and BPF needs root"
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "this script knows apt only; install python3-bpfcc (bcc), python3-venv, gcc and iproute2 by hand"
    exit 2
fi

# bcc comes from the distribution: PyPI's `bcc` is an unrelated package.
PKGS="python3 python3-venv python3-bpfcc gcc libc6-dev iproute2 util-linux"
if [ "${1:-}" = "--with-peers" ]; then
    PKGS="$PKGS bpfcc-tools libbpf-tools bpftrace"
fi
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # libbpf-tools is not packaged everywhere (e.g. older Ubuntu): peers are optional
    apt-get install -y -q --no-install-recommends $missing >&2 || {
        for p in $missing; do apt-get install -y -q --no-install-recommends "$p" >&2 || say "could not install $p"; done
    }
    for p in python3-bpfcc python3-venv gcc; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || { say "$p is required"; exit 2; }
    done
fi

# Peer tools for bench/ (bcc's tcpstates/tcplife) need a kernel header tree; when the running
# kernel has none packaged, give them Debian's closest headers (their byte columns are then
# wrong, which is one of the things the benchmark shows). tcplife-trace itself never uses them.
if [ "${1:-}" = "--with-peers" ] && [ ! -e "/lib/modules/$(uname -r)/source" ]; then
    if apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        say "installed linux-headers-$(uname -r) for the peer tools"
    elif apt-get install -y -q --no-install-recommends linux-headers-amd64 >&2; then
        hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | grep -v -- '-rt-\|-cloud-' | sort -V | tail -n 1)
        if [ -n "$hdr" ]; then
            mkdir -p "/lib/modules/$(uname -r)"
            ln -sfn "$hdr" "/lib/modules/$(uname -r)/build"
            # Debian splits the tree: arch-specific part (build) and common part (source)
            common=$(echo "$hdr" | sed 's/-amd64$/-common/')
            [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$(uname -r)/source"
            say "peer tools: no headers for $(uname -r); linked $hdr (mismatched: bcc byte counts will be wrong)"
        fi
    else
        say "no kernel headers for the bcc peer tools: they will be reported as not runnable"
    fi
fi

# Kernel headers are NOT needed: the BPF program compiles against ebpf/stubs and
# reads struct fields through offsets from /sys/kernel/btf/vmlinux.
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    say "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing
fi

# An isolated venv from the system interpreter; bcc is found in the distribution's
# directory at run time (probes/bcc_import.py), nothing else from dist-packages leaks in.
PY=/usr/bin/python3
if [ ! -x "$VENV/bin/python" ] || [ "$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')" != "$("$PY" -c 'import sys; print(sys.base_prefix)')" ]; then
    say "creating venv $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tcplife-trace-installed"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing tcplife-trace and its Python dependencies into $VENV"
    log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
           "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test,fleet]"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        say "pip install failed (full log: $log)"
        exit 2
    fi
    echo "$want" > "$stamp"
fi
