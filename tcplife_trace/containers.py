"""Where a connection's owner lives: its cgroup v2, the container and pod that cgroup is.

The kernel names a cgroup by its id (what bpf_get_current_cgroup_id() returns, and what
sock_diag gives as INET_DIAG_CGROUP_ID for a socket): the inode number of the cgroup's
directory in the cgroup2 file system. From the id we find the directory (by its kernfs file
handle, else by a walk of the tree), and from its path the container runtime's layout tells
the container id; the kubelet's layout the pod UID, and its log directory
(/var/log/pods/NAMESPACE_NAME_UID) the pod's name and namespace, with no API server asked.
What the host does not show is None (NA), never guessed.

    resolver = Resolver()
    home = resolver.by_id(cgroup_id)   # or resolver.by_pid(pid)
    home.runtime, home.container_id, home.pod_uid, home.netns
"""
from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from tcplife_trace.probes import cgroup_tree

PODS_LOG_DIR = "/var/log/pods"
DEFAULT_CAP = 4096          # cgroups remembered (ids are never reused: an entry stays true)
_WALK_EVERY_S = 1.0         # without file handles: the tree is walked again at most this often

_HEX64 = r"(?P<id>[0-9a-f]{64})"
# (runtime, pattern of one path component), the first match from the leaf up wins
_CONTAINER_PATTERNS = [
    ("docker", re.compile(rf"docker-{_HEX64}\.scope")),
    ("containerd", re.compile(rf"cri-containerd-{_HEX64}\.scope")),
    ("containerd", re.compile(rf"nerdctl-{_HEX64}\.scope")),
    ("cri-o conmon", re.compile(rf"crio-conmon-{_HEX64}\.scope")),  # the container's monitor
    ("cri-o", re.compile(rf"crio-{_HEX64}\.scope")),
    ("podman conmon", re.compile(rf"libpod-conmon-{_HEX64}\.scope")),
    ("podman", re.compile(rf"libpod-{_HEX64}(\.scope)?")),          # (cgroupfs: libpod_parent/libpod-ID)
]
# the kubelet: systemd driver kubepods[-QOS]-pod<UID with _>.slice, cgroupfs driver pod<UID>
_POD_SLICE = re.compile(r"kubepods(?:-[a-z]+)?-pod(?P<uid>[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice")
_POD_DIR = re.compile(r"pod(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_BARE_ID = re.compile(_HEX64)


@dataclass(frozen=True)
class Home:
    """A cgroup and what it is. Every field but cgroup_id may be None: not known on this host."""
    cgroup_id: int | None
    path: str | None = None            # inside the cgroup2 tree, "/..." (None: the cgroup is gone)
    runtime: str | None = None         # docker, containerd, cri-o, podman, cri, systemd service/scope
    container_id: str | None = None    # 64 hex digits
    pod_uid: str | None = None
    pod_name: str | None = None
    pod_namespace: str | None = None
    unit: str | None = None            # the systemd unit of the leaf (foo.service, docker-ID.scope)
    netns: int | None = None           # the network namespace (inode) of a process in the cgroup

    def columns(self) -> dict[str, object]:
        """The home as record/frame columns (COLUMNS; None: NA)."""
        return {"cgroup_id": self.cgroup_id, "cgroup": self.path, "runtime": self.runtime,
                "container_id": self.container_id, "pod_uid": self.pod_uid, "pod_name": self.pod_name,
                "pod_namespace": self.pod_namespace}


# what a connection's record or frame row carries of its owner's home (Home.columns)
COLUMNS = ("cgroup_id", "cgroup", "runtime", "container_id", "pod_uid", "pod_name", "pod_namespace")


def classify(path: str, pods_dir: str = PODS_LOG_DIR) -> Home:
    """What a cgroup path shows: runtime, container id, pod, systemd unit (cgroup_id left None)."""
    parts = [p for p in path.split("/") if p]
    runtime = container = pod = None
    for part in reversed(parts):
        for name, pattern in _CONTAINER_PATTERNS:
            m = pattern.fullmatch(part)
            if m:
                runtime, container = name, m.group("id")
                break
        if container:
            break
    for part in parts:
        m = _POD_SLICE.fullmatch(part)
        if m:
            pod = m.group("uid").replace("_", "-")
            break
        m = _POD_DIR.fullmatch(part)
        if m and "kubepods" in parts:
            pod = m.group("uid")
            break
    if container is None and pod is not None and parts and _BARE_ID.fullmatch(parts[-1]):
        runtime, container = "cri", parts[-1]   # cgroupfs driver: the runtime is not in the path
    if container is None and len(parts) >= 2 and parts[-2] == "docker" and _BARE_ID.fullmatch(parts[-1]):
        runtime, container = "docker", parts[-1]  # docker's cgroupfs driver: /docker/ID
    unit = parts[-1] if parts and parts[-1].endswith((".service", ".scope")) else None
    if runtime is None and unit is not None:
        runtime = "systemd service" if unit.endswith(".service") else "systemd scope"
    name = namespace = None
    if pod is not None:
        namespace, name = pod_name(pod, pods_dir)
    return Home(None, path, runtime, container, pod, name, namespace, unit)


def pod_name(uid: str, pods_dir: str = PODS_LOG_DIR) -> tuple[str | None, str | None]:
    """(namespace, name) of a pod from the kubelet's log directory NAMESPACE_NAME_UID (neither
    may hold an underscore); (None, None) when the host has no such directory."""
    try:
        entries = os.listdir(pods_dir)
    except OSError:
        return None, None
    for e in entries:
        bits = e.split("_")
        if len(bits) == 3 and bits[2] == uid:
            return bits[0], bits[1]
    return None, None


cgroup2_mount = cgroup_tree.mount  # (the tree's rules live in probes/cgroup_tree.py)


def pid_cgroup(pid: int) -> str | None:
    """The cgroup v2 path of a process (/proc/PID/cgroup's 0:: line); None if it is gone or
    the host has no cgroup v2."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def pid_netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


_HEX_PREFIX = re.compile(r"[0-9a-f]{12,64}")


def container_cgroups(prefix: str, mount: str | None = None, pods_dir: str = PODS_LOG_DIR) -> list[str]:
    """The cgroup paths of the container whose id is `prefix` (the full 64 hex digits or a
    unique prefix of at least 12): the cgroups the runtimes' layouts name it by (not its
    conmon's), without those below another of them. ValueError (one line) for a prefix that is
    not such, names no container on this host, or more than one."""
    if not _HEX_PREFIX.fullmatch(prefix):
        raise ValueError(f"container {prefix}: give its id, 12 to 64 lowercase hex digits")
    mount = mount if mount is not None else cgroup2_mount()
    if mount is None:
        raise ValueError("this host has no cgroup v2 file system mounted: --cgroup and --container need one")
    found: dict[str, list[str]] = {}
    for path in sorted(cgroup_tree.walk(mount).values()):
        home = classify(path, pods_dir)
        if home.container_id and home.container_id.startswith(prefix) and not home.runtime.endswith("conmon"):
            paths = found.setdefault(home.container_id, [])
            if not any(path.startswith(p + "/") for p in paths):
                paths.append(path)
    if not found:
        raise ValueError(f"container {prefix}: no such container's cgroup under {mount}")
    if len(found) > 1:
        raise ValueError(f"container {prefix}: the prefix of {len(found)} containers' ids "
                         f"({', '.join(sorted(i[:16] for i in found))}): give more of it")
    return next(iter(found.values()))


def targets(cgroups=(), containers=(), mount: str | None = None, pods_dir: str = PODS_LOG_DIR) -> tuple:
    """The --cgroup PATH and --container ID arguments as probes.filters.CgroupTarget, for
    Filters(cgroups=...): a connection matches when its owner's cgroup is one of them or below
    one. ValueError (one line) for a path that is no cgroup, an id that names no container."""
    from tcplife_trace.probes.filters import cgroup_target
    mount = mount if mount is not None else cgroup2_mount()
    out = [cgroup_target(c, mount) for c in cgroups]
    for prefix in containers:
        for path in container_cgroups(prefix, mount, pods_dir):
            t = cgroup_target(path, mount)
            out.append(replace(t, label=f"container {prefix}"))
    return tuple(dict.fromkeys(out))


class Resolver:
    """cgroup ids and pids to Homes, with a cache of at most `cap` cgroups (least recently used
    leave first; counted in `evicted`). `unresolved` counts ids whose cgroup was not found (gone
    before we looked: a short-lived container); they are remembered too (ids are not reused)."""

    def __init__(self, cap: int = DEFAULT_CAP, pods_dir: str = PODS_LOG_DIR, mount: str | None = None):
        self.cap = cap
        self.pods_dir = pods_dir
        self.mount = mount if mount is not None else cgroup2_mount()
        self.cache: OrderedDict[int, Home] = OrderedDict()
        self.hits = self.misses = self.evicted = self.unresolved = 0
        self.handles = True           # open_by_handle_at works here (else: walks)
        self._walked: dict[int, str] = {}
        self._walked_at = -_WALK_EVERY_S

    # -- ids to paths ------------------------------------------------------------------
    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup's path inside the cgroup2 tree ("/" for the root), None if not found."""
        if self.mount is None:
            return None
        if self.handles:
            try:
                return cgroup_tree.path_by_handle(self.mount, cgroup_id)
            except FileNotFoundError:
                return None             # (ESTALE too: the cgroup is gone)
            except OSError:
                self.handles = False    # not permitted here: walk from now on
        path = self._walked.get(cgroup_id)
        if path is None and time.monotonic() - self._walked_at >= _WALK_EVERY_S:
            self._walk()
            path = self._walked.get(cgroup_id)
        return path

    def _walk(self) -> None:
        self._walked_at = time.monotonic()
        self._walked = cgroup_tree.walk(self.mount)

    # -- Homes ---------------------------------------------------------------------------
    def by_id(self, cgroup_id: int) -> Home:
        home = self.cache.get(cgroup_id)
        if home is not None:
            self.hits += 1
            self.cache.move_to_end(cgroup_id)
            return home
        self.misses += 1
        path = self.path_of(cgroup_id)
        if path is None:
            self.unresolved += 1
            home = Home(cgroup_id)
        else:
            home = replace(classify(path, self.pods_dir), cgroup_id=cgroup_id, netns=self._netns(path))
        self.cache[cgroup_id] = home
        if len(self.cache) > self.cap:
            self.cache.popitem(last=False)
            self.evicted += 1
        return home

    def by_pid(self, pid: int) -> Home | None:
        """The Home of a process known in user space (from /proc/PID/cgroup); None if it is gone."""
        path = pid_cgroup(pid)
        if path is None:
            return None
        cgroup_id = self.id_of(path)
        if cgroup_id is None:
            return replace(classify(path, self.pods_dir), netns=pid_netns(pid))
        home = self.by_id(cgroup_id)
        return home if home.netns is not None else replace(home, netns=pid_netns(pid))

    def id_of(self, path: str) -> int | None:
        """A cgroup path's id (its directory's inode); None if it is not there."""
        if self.mount is None:
            return None
        return cgroup_tree.id_of(self.mount, path)

    def _netns(self, path: str) -> int | None:
        """The network namespace of the first process found in the cgroup (a container's
        processes share one); None for a cgroup with no process of its own."""
        try:
            with open(self.mount.rstrip("/") + path.rstrip("/") + "/cgroup.procs") as f:
                pids = f.read().split()
        except OSError:
            return None
        for pid in pids:
            ns = pid_netns(int(pid))
            if ns is not None:
                return ns
        return None

    def counters(self) -> dict[str, int]:
        return {"cgroups_cached": len(self.cache), "cgroup_cache_hits": self.hits,
                "cgroup_cache_misses": self.misses, "cgroups_evicted": self.evicted,
                "cgroups_unresolved": self.unresolved}
