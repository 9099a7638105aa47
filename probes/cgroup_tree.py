"""The cgroup v2 tree: where it is mounted, a cgroup's id (its directory's inode, what
bpf_get_current_cgroup_id() returns) and, from an id, its path ("/" is the root).

The kernel names a cgroup by its id; the directory of an id is found by its kernfs file handle
(open_by_handle_at, which needs CAP_DAC_READ_SEARCH), else by a walk of the tree.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import struct

SYS_FS_CGROUP = "/sys/fs/cgroup"

_libc = ctypes.CDLL(None, use_errno=True)
_FILEID_KERNFS = 0xFE
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup2 file system is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
    a hybrid host); None without one."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split(" ")[4])
    return None


def open_by_id(mount_fd: int, cgroup_id: int) -> int:
    """An O_PATH descriptor of the cgroup whose id this is (its kernfs file handle is the id);
    OSError otherwise."""
    handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, _FILEID_KERNFS, cgroup_id))
    fd = _libc.open_by_handle_at(mount_fd, handle, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def path_by_handle(root: str, cgroup_id: int) -> str:
    """The path inside the tree mounted at root of the cgroup with this id, by its file
    handle; FileNotFoundError if it is gone (or outside the tree), another OSError when file
    handles cannot be opened here."""
    mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = open_by_id(mfd, cgroup_id)
        except OSError as e:
            if e.errno in (errno.ESTALE, errno.ENOENT):
                raise FileNotFoundError(e.errno, e.strerror) from None
            raise
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    finally:
        os.close(mfd)
    if where == root:
        return "/"
    if not where.startswith(root.rstrip("/") + "/"):
        raise FileNotFoundError(f"cgroup {cgroup_id} is outside {root}: {where}")
    return where[len(root.rstrip("/")):]


def walk(root: str, under: str = "/") -> dict[int, str]:
    """{id: path} of every cgroup at or below `under` (a path inside the tree at root)."""
    found = {}
    base = root.rstrip("/")
    for here, _dirs, _files in os.walk(base + (under if under != "/" else "")):
        try:
            found[os.stat(here).st_ino] = here[len(base):] or "/"
        except OSError:
            continue
    return found


def id_of(root: str, path: str) -> int | None:
    """A cgroup path's id (its directory's inode); None if it is not there."""
    try:
        return os.stat(root.rstrip("/") + (path if path != "/" else "")).st_ino
    except OSError:
        return None


def level(path: str) -> int:
    """A cgroup's depth below the root (the root's is 0): bpf_get_current_ancestor_cgroup_id's
    level."""
    return len([p for p in path.split("/") if p])


def cgroup_path(given: str, root: str | None) -> str:
    """A --cgroup argument as a path inside the cgroup2 tree ("/a/b"): a directory under the
    cgroup2 mount (absolute), or a path relative to the mount (a leading "/" allowed, as
    /proc/PID/cgroup and the `cgroup` columns show it). ValueError (one line) if the host has no
    cgroup v2, or the path names no cgroup there."""
    if root is None:
        raise ValueError("this host has no cgroup v2 file system mounted: --cgroup and --container need one")
    base = root.rstrip("/")
    full = os.path.normpath(given) if given.startswith(base + "/") or given == base else \
        os.path.normpath(base + "/" + given.lstrip("/"))
    if full != base and not full.startswith(base + "/"):
        raise ValueError(f"cgroup {given}: not inside the cgroup v2 tree at {root}")
    if not os.path.isdir(full) or not os.path.exists(full + "/cgroup.procs"):
        raise ValueError(f"cgroup {given}: no such cgroup under {root}")
    try:
        if os.stat(full).st_dev != os.stat(base).st_dev:  # (another file system mounted inside)
            raise ValueError(f"cgroup {given}: not a cgroup v2 directory (another file system under {root})")
    except OSError as e:
        raise ValueError(f"cgroup {given}: {e.strerror}") from None
    return full[len(base):] or "/"
