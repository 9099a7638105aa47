"""Network namespaces: which exist, and running code inside one.

sock_diag, /proc/net/* and /proc/sys/net/* answer for the namespace of the
calling thread, so each is read after setns() on this thread, which is then
switched back. The tracer itself sees every namespace from the root one.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Netns:
    inode: int
    path: str          # something setns() can open: /run/netns/NAME or /proc/PID/ns/net
    name: str          # the `ip netns` name, or "pid PID" for an unnamed one


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def list_all(errors: list[str] | None = None) -> list[Netns]:
    """Every namespace reachable: named ones (`ip netns`) and those of running processes.
    One entry per inode; ours (named "host") first. Processes whose namespace we may not even
    look at (no CAP_SYS_PTRACE) are said in `errors`, once, not skipped in silence."""
    found: dict[int, Netns] = {}
    own = f"/proc/{os.getpid()}/ns/net"
    found[_inode(own)] = Netns(_inode(own), own, "host")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/run/netns")):
            path = f"/run/netns/{name}"
            ino = _inode(path)
            if ino is not None and ino not in found:
                found[ino] = Netns(ino, path, name)
    hidden: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            path = f"/proc/{entry.name}/ns/net"
            try:
                ino = os.stat(path).st_ino
            except PermissionError:
                hidden.append(int(entry.name))
                continue
            except OSError:
                continue  # exited
            if ino not in found:
                found[ino] = Netns(ino, path, f"pid {entry.name}")
    if hidden and errors is not None:
        errors.append(f"the network namespace of {_some(hidden)} could not be looked at (/proc/PID/ns/net: "
                      "permission denied): sockets in a namespace only they use are not in the snapshot")
    return list(found.values())


def _some(pids: list[int]) -> str:
    """'pid 1' or 'pids 1, 7, ...': a wording that stays the same from one look to the next as
    long as the lowest ones do (a live trace says each such line once)."""
    pids = sorted(pids)
    return f"pid {pids[0]}" if len(pids) == 1 else "pids " + ", ".join(map(str, pids[:3])) + (", ..." if len(pids) > 3 else "")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(ns: Netns):
    """Run the body in `ns` (this thread only); back to the original namespace after."""
    if _inode(ns.path) == current_inode():
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(ns.path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
