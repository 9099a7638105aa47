"""The -p/-L/-D/-4/-6 filters, shared by the kernel side and user space.

The kernel applies them to what each event shows, as a cost saving that never
drops a matching event; user space applies them exactly to each connection.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Filters:
    pids: tuple[int, ...] = ()
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: int | None = None  # 4, 6 or None

    def active(self) -> bool:
        return bool(self.pids or self.lports or self.rports or self.family)

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
        return "; ".join(parts) or "none"

    def cdefines(self) -> list[str]:
        """#define lines for ebpf/tcplife.bpf.c."""
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
        return out

    def match(self, *, family: int | None, lport: int | None, rport: int | None,
              role: str, owner_pids: tuple[int, ...]) -> bool:
        """Exact verdict for a connection. family is 4 or 6 (v4-mapped counts as 4)."""
        if self.family and family and family != self.family:
            return False
        if self.pids and not set(owner_pids) & set(self.pids):
            return False
        if self.lports and lport not in self.lports:
            return False
        if self.rports and (role == "listener" or rport not in self.rports):
            return False
        return True

    def match_columns(self, *, family, lport, rport, listener, owned):
        """match() on many connections at once (numpy arrays, one value per connection):
        family 4, 6 or 0 when unknown; lport/rport 0 when unknown; listener: role is
        "listener"; owned: one of its owner pids is one of self.pids (read only with -p).
        The same rule, clause by clause (a test checks they agree on every combination)."""
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
        return keep
