"""The -p/-L/-D/-4/-6 and --cgroup/--container filters, shared by the kernel side and user space.

The kernel applies them to what each event shows, as a cost saving that never
drops a matching event; user space applies them exactly to each connection.

A cgroup filter keeps a connection whose owner's cgroup (the kernel's fold: the task that
connected or listened, for an accepted socket its listener's owner until a task of its own
reads, writes or closes it) is one of the targets or below one. The kernel decides where the
task running is the owner (connect(), listen()): bpf_get_current_ancestor_cgroup_id(level) is
the target's id, when the kernel lets a tracepoint program call it (`cdefines(ancestor=...)`);
user space decides on the lifecycle's cgroup id, one look per distinct id (`cgroup_match`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import cgroup_tree

_VERDICTS_MAX = 65536  # cgroup ids remembered by cgroup_match (cleared past it)


@dataclass(frozen=True)
class CgroupTarget:
    """A cgroup v2 directory a connection's owner must be in, or below."""
    path: str        # inside the cgroup2 tree: "/" (the root), "/system.slice/foo.service"
    id: int          # its id (the directory's inode)
    level: int       # its depth below the root (the root's is 0)
    label: str = ""  # what was asked for, if not the path: "container 4f0c1d2e3b4a"

    def holds(self, path: str) -> bool:
        return self.path == "/" or path == self.path or path.startswith(self.path + "/")


def cgroup_target(given: str, root: str | None = None) -> CgroupTarget:
    """--cgroup PATH as a target: a directory under the cgroup2 mount, or a path relative to
    it ("/" allowed in front). ValueError (one line) when it is no cgroup."""
    root = root if root is not None else cgroup_tree.mount()
    path = cgroup_tree.cgroup_path(given, root)
    cid = cgroup_tree.id_of(root, path)
    if cid is None:
        raise ValueError(f"cgroup {given}: no such cgroup under {root}")
    return CgroupTarget(path, cid, cgroup_tree.level(path))


@dataclass(frozen=True)
class Filters:
    pids: tuple[int, ...] = ()
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: int | None = None  # 4, 6 or None
    cgroups: tuple[CgroupTarget, ...] = ()
    # cgroup id -> at or below a target (cgroup_match's answers; ids are never reused)
    _verdicts: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    _root: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def active(self) -> bool:
        return bool(self.pids or self.lports or self.rports or self.family or self.cgroups)

    def describe(self) -> str:
        parts = []
        if self.pids:
            parts.append("pid " + ",".join(map(str, self.pids)))
        if self.lports:
            parts.append("lport " + ",".join(map(str, self.lports)))
        if self.rports:
            parts.append("rport " + ",".join(map(str, self.rports)))
        if self.family:
            parts.append(f"IPv{self.family}")
        parts += dict.fromkeys(t.label or f"cgroup {t.path}" for t in self.cgroups)  # (a container: one)
        return "; ".join(parts) or "none"

    def cdefines(self, ancestor: bool = True) -> list[str]:
        """#define lines for ebpf/tcplife.bpf.c; ancestor: the program may call
        bpf_get_current_ancestor_cgroup_id (else the cgroup filter is user space's alone)."""
        def any_of(var: str, values: tuple[int, ...]) -> str:
            return "(" + " || ".join(f"({var}) == {int(v)}" for v in values) + ")"
        out = []
        if self.pids:
            out += ["#define TLT_FILTER_PID", f"#define TLT_PID_OK(p) {any_of('p', self.pids)}"]
        if self.lports:
            out += ["#define TLT_FILTER_LPORT", f"#define TLT_LPORT_OK(p) {any_of('p', self.lports)}"]
        if self.rports:
            out += ["#define TLT_FILTER_RPORT", f"#define TLT_RPORT_OK(p) {any_of('p', self.rports)}"]
        if self.family == 4:
            out.append("#define TLT_FILTER_IPV4")
        elif self.family == 6:
            out.append("#define TLT_FILTER_IPV6")
        if self.cgroups and ancestor:
            test = " || ".join(f"(bpf_get_current_ancestor_cgroup_id({t.level}) == {t.id}ULL)" for t in self.cgroups)
            out += ["#define TLT_FILTER_CGROUP", f"#define TLT_CGROUP_OK() ({test})"]
        return out

    def cgroup_match(self, cgroup_id: int | None) -> bool:
        """Whether a cgroup (by id) is one of the targets or below one: by its path now (its
        file handle), remembered per id. None or 0 (no owner known) does not match, nor a
        cgroup gone before it was first asked about that was not there at the start."""
        if not cgroup_id:
            return False
        if not self._verdicts:
            self._seed()
        v = self._verdicts.get(cgroup_id)
        if v is None:
            if len(self._verdicts) > _VERDICTS_MAX:
                self._verdicts.clear()
                self._seed()
            v = self._verdicts.get(cgroup_id)
        if v is None:
            v = self._verdicts[cgroup_id] = self._under(cgroup_id)
        return v

    def _seed(self) -> None:
        """Every cgroup at or below a target now is known to match (even once it is gone)."""
        root = self._mount()
        self._verdicts[0] = False  # (seeded: not again until cleared)
        if root is None:
            return
        for t in self.cgroups:
            for cid in cgroup_tree.walk(root, t.path):
                self._verdicts[cid] = True

    def cgroup_match_recorded(self, cgroup_id: int | None, path: str | None) -> bool:
        """cgroup_match for a recording read later or elsewhere: by the id, and by the path the
        recording resolved it to when it was written (None: gone by then), held by a target as
        cgroup_match holds it (CgroupTarget.holds)."""
        if not cgroup_id:
            return False
        return any(t.id == cgroup_id for t in self.cgroups) or (
            path is not None and any(t.holds(path) for t in self.cgroups))

    def _mount(self) -> str | None:
        if not self._root:
            self._root.append(cgroup_tree.mount())
        return self._root[0]

    def _under(self, cgroup_id: int) -> bool:
        if any(t.id == cgroup_id for t in self.cgroups):
            return True
        root = self._mount()
        if root is None:
            return False
        try:
            path = cgroup_tree.path_by_handle(root, cgroup_id)
        except FileNotFoundError:
            return False
        except OSError:  # no file handles here: the targets' subtrees walked
            found = {}
            for t in self.cgroups:
                found.update(cgroup_tree.walk(root, t.path))
            path = found.get(cgroup_id)
            if path is None:
                return False
        return any(t.holds(path) for t in self.cgroups)

    def seeded(self) -> "Filters":
        """These filters with the cgroups now at or below the targets remembered as matching
        (a session calls it at its start)."""
        if self.cgroups and not self._verdicts:
            self._seed()
        return self

    def match(self, *, family: int | None, lport: int | None, rport: int | None,
              role: str, owner_pids: tuple[int, ...], cgroup_id: int | None = None) -> bool:
        """Exact verdict for a connection. family is 4 or 6 (v4-mapped counts as 4);
        cgroup_id: its owner's cgroup (read only with cgroup targets)."""
        if self.family and family and family != self.family:
            return False
        if self.pids and not set(owner_pids) & set(self.pids):
            return False
        if self.lports and lport not in self.lports:
            return False
        if self.rports and (role == "listener" or rport not in self.rports):
            return False
        if self.cgroups and not self.cgroup_match(cgroup_id):
            return False
        return True

    def match_columns(self, *, family, lport, rport, listener, owned, cgroup_id=None):
        """match() on many connections at once (numpy arrays, one value per connection):
        family 4, 6 or 0 when unknown; lport/rport 0 when unknown; listener: role is
        "listener"; owned: one of its owner pids is one of self.pids (read only with -p);
        cgroup_id: the owner's cgroup, 0 when unknown (read only with cgroup targets: one
        cgroup_match per distinct id). The same rule, clause by clause (a test checks they
        agree on every combination)."""
        import numpy as np
        keep = np.ones(len(lport), dtype=bool)
        if self.family:
            keep &= (family == 0) | (family == self.family)
        if self.pids:
            keep &= owned
        if self.lports:
            keep &= np.isin(lport, self.lports)
        if self.rports:
            keep &= ~listener & np.isin(rport, self.rports)
        if self.cgroups:
            if cgroup_id is None:
                raise ValueError("cgroup filters need the connections' cgroup ids")
            ids, inv = np.unique(np.asarray(cgroup_id, dtype=np.uint64), return_inverse=True)
            keep &= np.array([self.cgroup_match(i) for i in ids.tolist()], dtype=bool)[inv.ravel()]
        return keep
