"""Socket inode -> the processes holding it open, from /proc/*/fd (what `ss -p` shows).

Authoritative where the tracer only guesses, and many-to-many: a forked child
holds its parent's sockets too. Socket inodes are global, so one scan serves
every namespace. Cost grows with processes x descriptors: a few ms when idle.
"""
from __future__ import annotations

import os
from typing import NamedTuple


class Holder(NamedTuple):
    pid: int
    comm: str
    fd: int


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def holders(inodes: set[int] | None = None, unreadable: list[int] | None = None) -> dict[int, list[Holder]]:
    """{inode: [Holder, ...]} for socket inodes (all, or only those asked for). The pids whose
    descriptors we may not read (no CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH) go into `unreadable`:
    their sockets have no owner here, and the caller says so."""
    found: dict[int, list[Holder]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = entry.name
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone
        except PermissionError:
            if unreadable is not None:
                unreadable.append(int(pid))
            continue
        except OSError:
            continue
        comm = None
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except PermissionError:  # listed (CAP_DAC_READ_SEARCH) but not readable (no CAP_SYS_PTRACE)
                if unreadable is not None:
                    unreadable.append(int(pid))
                break
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            ino = int(target[8:-1])
            if inodes is not None and ino not in inodes:
                continue
            if comm is None:
                comm = _comm(pid)
            found.setdefault(ino, []).append(Holder(int(pid), comm, int(fd)))
    return found
