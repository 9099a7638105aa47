"""Leak and pile detectors: the playbook of docs/tcp-troubleshooting.md, as code (that file
puts each detector's rule and thresholds next to the playbook row it automates).

Input is plain data, whatever it came from: `Evidence` (analysis/evidence.py, with what
shapes it: the sockets and ended connections frames, the filters' scope, the ended
connections' health per peer).
Each detector returns `Finding`s with the sockets, owner, ages and rates that
back it, and advice. Thresholds are in `Thresholds`; every one is a flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from tcplife_trace.analysis.evidence import TALLY_COUNTS, Evidence, bucket_ms, endpoint, endpoints

SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

TIME_WAIT_S = 60.0  # TCP_TIMEWAIT_LEN: fixed in Linux


@dataclass
class Thresholds:
    close_wait_age_s: float = 5.0      # CLOSE_WAIT longer than this is the application's bug
    fin_wait1_age_s: float = 10.0      # our FIN unacknowledged this long: the peer is gone
    fin_wait2_age_s: float = 30.0      # half-closed this long: the peer never closes
    last_ack_age_s: float = 10.0
    closing_age_s: float = 10.0
    pile_warning: int = 10             # sockets in one group for a pile to be a warning
    pile_critical: int = 100
    syn_sent_failures: int = 3         # failed or stuck connects to one destination
    syn_sent_age_s: float = 1.0        # a SYN_SENT socket older than this is stuck
    fanout_destinations: int = 50      # distinct failing destinations from one process
    syn_recv_per_listener: int = 16    # half-open request sockets on one listener
    time_wait_use: float = 0.5         # TIME_WAIT share of the ephemeral range (now or steady)
    time_wait_rate: float = 500.0      # active closes per second to one destination
    idle_established_s: float = 600.0  # no data either way, keepalive off
    peer_connections: int = 200        # ESTABLISHED + CLOSE_WAIT held by one peer
    # the health of the connections that ended (the kernel's fold at each CLOSE), per peer
    retrans_storm_connections: int = 3   # ended connections to one peer that retransmitted...
    retrans_storm_segments: int = 100    # ...or segments re-sent to it
    retrans_storm_share: float = 0.01    # and at least this share of the data segments sent re-sent
    slow_peer_samples: int = 20          # handshakes (or RTTs) a peer needs to be compared...
    slow_peer_others: int = 2            # ...with at least this many other peers that have as many
    slow_peer_factor: float = 4.0        # its median this many times the others' median...
    slow_peer_excess_ms: float = 10.0    # ...and this much above it
    retrans_deaths: int = 3              # connections to one peer that died after retransmitting

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class Finding:
    kind: str
    severity: str
    count: int
    summary: str
    advice: str
    netns: int | None = None
    owner_pid: int | None = None
    owner_comm: str | None = None
    local: str | None = None
    peer: str | None = None
    rate_per_s: float | None = None
    oldest_age_s: float | None = None
    age_lower_bound: bool = False
    samples: list[str] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    # a finding of a run with several looks (live, doctor): when a look first showed it, and
    # when a later look no longer did (ISO-8601 UTC; None: still there at the last look)
    first_seen_at: str | None = None
    resolved_at: str | None = None

    def key(self) -> tuple:
        return (self.kind, self.netns, self.owner_pid, self.local, self.peer)

    def as_dict(self) -> dict:
        """Field -> value (samples and evidence copied one level, as JSON needs no more)."""
        d = {f.name: getattr(self, f.name) for f in _FINDING_FIELDS}
        d["samples"], d["evidence"] = list(self.samples), dict(self.evidence)
        return d


_FINDING_FIELDS = fields(Finding)
_RUN_FIELDS = ("first_seen_at", "resolved_at")  # not in the leaks() frame: a recording is judged once


def _int(v):
    return None if v is None or pd.isna(v) else int(v)


def _float(v):
    return None if v is None or pd.isna(v) else round(float(v), 3)


def _pile_severity(n: int, t: Thresholds) -> str:
    return "critical" if n >= t.pile_critical else "warning" if n >= t.pile_warning else "info"


def _samples(rows: pd.DataFrame, limit: int = 5) -> list[str]:
    out = []
    for r in rows.sort_values("age_s", ascending=False, na_position="last").head(limit).itertuples():
        age = "" if pd.isna(r.age_s) else f" {'>=' if r.age_lower_bound else ''}{r.age_s:.1f}s"
        owner = "" if pd.isna(r.owner_pid) else f" pid={int(r.owner_pid)}"
        fd = "" if pd.isna(r.owner_fd) else f" fd={int(r.owner_fd)}"
        out.append(f"{endpoint(r.laddr, r.lport)} -> {endpoint(r.raddr, r.rport)} {r.state}{age}{owner}{fd}")
    return out


def _oldest(g: pd.DataFrame) -> tuple[float, bool, str | None]:
    """The oldest socket's age, whether it is only a lower bound, and where it came from."""
    ages = g["age_s"]
    if not ages.notna().any():  # e.g. analyze --since cut every entry into the state away
        return float("nan"), True, None
    i = ages.idxmax()
    src = g.loc[i, "age_source"] if "age_source" in g else None
    return g.loc[i, "age_s"], bool(g.loc[i, "age_lower_bound"]), None if pd.isna(src) else str(src)


def _owner_key(df: pd.DataFrame) -> pd.DataFrame:
    """Group keys that keep unknown owners together instead of dropping them."""
    df = df.copy()
    df["_pid"] = df["owner_pid"].fillna(-1).astype("int64")
    df["_comm"] = df["owner_comm"].fillna("?").astype(str)
    return df


def _weights(df: pd.DataFrame) -> np.ndarray:
    return df["n"].to_numpy(dtype=np.int64) if "n" in df else np.ones(len(df), dtype=np.int64)


def _listener_ports(sockets: pd.DataFrame) -> set[tuple]:
    lis = sockets[sockets["state"] == "LISTEN"]
    return set(zip(lis["netns"], lis["lport"]))


# -- detectors -----------------------------------------------------------------------------

def close_wait_leaks(ev: Evidence, t: Thresholds) -> list[Finding]:
    """The peer closed and our process never did: grouped by owner and the service it talks to."""
    cw = ev.sockets[(ev.sockets["state"] == "CLOSE_WAIT") & (ev.sockets["age_s"] >= t.close_wait_age_s)]
    if cw.empty:
        return []
    cw = _owner_key(cw)
    servers = _listener_ports(ev.sockets)
    # a socket accepted on one of our listeners is identified by our port; an outgoing one by its peer
    accepted = [(n, p) in servers for n, p in zip(cw["netns"], cw["lport"])]
    cw["_local"] = [endpoint(a, p) if acc else None for a, p, acc in zip(cw["laddr"], cw["lport"], accepted)]
    cw["_peer"] = [None if acc else endpoint(a, p) for a, p, acc in zip(cw["raddr"], cw["rport"], accepted)]
    out = []
    for (ns, pid, comm, local, peer), g in cw.groupby(["netns", "_pid", "_comm", "_local", "_peer"],
                                                      dropna=False, sort=False):
        n = len(g)
        oldest, lower, source = _oldest(g)
        seen_eof = int(g["eof_age_s"].notna().sum())
        who = f"pid {pid} ({comm})" if pid >= 0 else "an unknown process"
        what = f"connections accepted on {local}" if isinstance(local, str) else f"connections to {peer}"
        summary = (f"CLOSE_WAIT leak: {who} has not closed {n} {what} that the peer closed; "
                   f"oldest {'>=' if lower else ''}{oldest:.1f}s")
        if seen_eof:
            summary += f"; it read the EOF on {seen_eof} of them and still did not close"
        out.append(Finding(
            "close_wait_leak", "critical" if n >= t.pile_critical else "warning", n, summary,
            "The application must close() the socket once read() returns 0 (EOF); look for a code "
            "path that drops the connection object without closing it (pools, error paths). Each "
            "leaked socket holds a file descriptor until the process exits.",
            netns=_int(ns), owner_pid=pid if pid >= 0 else None, owner_comm=comm if pid >= 0 else None,
            local=local if isinstance(local, str) else None, peer=peer if isinstance(peer, str) else None,
            oldest_age_s=_float(oldest), age_lower_bound=lower, samples=_samples(g),
            evidence={"eof_read": seen_eof, "fds": sorted(int(x) for x in g["owner_fd"].dropna())[:20],
                      "age_source": source}))
    return out


_PILES = {
    "FIN_WAIT1": ("fin_wait1_pile", "fin_wait1_age_s",
                  "we sent FIN and {peer} never acknowledged it: the peer is gone or unreachable",
                  ("Usually follows a shutdown of a server with many clients, or peers that vanished; "
                   "the kernel gives up after tcp_orphan_retries. Check reachability of the peers.")),
    "FIN_WAIT2": ("fin_wait2_stuck", "fin_wait2_age_s",
                  "half-closed: {peer} acknowledged our FIN but never closes its side",
                  ("The peer application keeps its end open. Orphaned sockets are bounded by "
                   "net.ipv4.tcp_fin_timeout; a socket our process still holds (shutdown(SHUT_WR)) is "
                   "not: close it after a timeout.")),
    "LAST_ACK": ("last_ack_pile", "last_ack_age_s",
                 "we closed after the peer, and {peer} never acknowledged our FIN",
                 ("Typical when a load-test client or peer host is killed abruptly; the sockets "
                  "time out on their own (retransmission limit). Check whether the peers are alive.")),
    "CLOSING": ("closing_pile", "closing_age_s",
                "both sides closed at once and {peer} does not acknowledge",
                "Simultaneous closes are rare; many of them point at a peer or middlebox dropping ACKs."),
}


def close_piles(ev: Evidence, t: Thresholds) -> list[Finding]:
    """FIN_WAIT1, FIN_WAIT2, LAST_ACK and CLOSING sockets older than their threshold, per peer."""
    out = []
    for state, (kind, attr, text, advice) in _PILES.items():
        rows = ev.sockets[(ev.sockets["state"] == state) & (ev.sockets["age_s"] >= getattr(t, attr))]
        if rows.empty:
            continue
        rows = _owner_key(rows)
        for (ns, raddr, pid, comm), g in rows.groupby(["netns", "raddr", "_pid", "_comm"], sort=False):
            n = len(g)
            ports = sorted({int(p) for p in g["rport"]})
            peer = raddr if len(ports) > 3 else ", ".join(endpoint(raddr, p) for p in ports)
            oldest, lower, source = _oldest(g)
            summary = (f"{state}: {n} socket{'s' if n > 1 else ''} where " + text.format(peer=peer)
                       + f"; oldest {'>=' if lower else ''}{oldest:.1f}s")
            orphans = int((g["inode"] == 0).sum())
            out.append(Finding(
                kind, _pile_severity(n, t), n, summary, advice, netns=_int(ns),
                owner_pid=pid if pid >= 0 else None, owner_comm=comm if pid >= 0 else None,
                peer=peer, oldest_age_s=_float(oldest), age_lower_bound=lower, samples=_samples(g),
                evidence={"orphaned": orphans, "age_source": source}))
    return out


def syn_sent_storms(ev: Evidence, t: Thresholds) -> list[Finding]:
    """Connects that fail or hang, per destination; many distinct destinations per process apart."""
    ended = ev.ended[(ev.ended["role"] == "active") & ev.ended["end_reason"].isin(["refused", "timeout"])]
    stuck = ev.sockets[(ev.sockets["state"] == "SYN_SENT") & (ev.sockets["age_s"] >= t.syn_sent_age_s)]
    rows = pd.concat([
        pd.DataFrame({"netns": ended["netns"], "raddr": ended["raddr"], "rport": ended["rport"],
                      "owner_pid": ended["owner_pid"], "owner_comm": ended["owner_comm"],
                      "outcome": ended["end_reason"].astype(str), "age_s": np.nan, "n": _weights(ended)}),
        pd.DataFrame({"netns": stuck["netns"], "raddr": stuck["raddr"], "rport": stuck["rport"],
                      "owner_pid": stuck["owner_pid"], "owner_comm": stuck["owner_comm"],
                      "outcome": "pending", "age_s": stuck["age_s"], "n": 1,
                      "lower": stuck["age_lower_bound"].astype(bool),
                      "source": stuck["age_source"].astype(object)}),
    ], ignore_index=True)
    if rows.empty:
        return []
    rows = _owner_key(rows)
    rows["_dest"] = endpoints(rows["raddr"], rows["rport"])
    rows["_ns"] = pd.to_numeric(rows["netns"]).astype("Int64").fillna(-1).astype("int64")  # (an unknown netns is a group too; UInt32 holds no -1)
    out = []
    fanned = set()
    for (ns, pid, comm), g in rows.groupby(["_ns", "_pid", "_comm"], sort=False):  # per process
        dests = g["_dest"].nunique()
        if dests >= t.fanout_destinations:
            fanned.add((ns, pid, comm))
            n = int(g["n"].sum())
            who = f"pid {pid} ({comm})" if pid >= 0 else "unknown processes"
            ports = g["rport"].nunique()
            out.append(Finding(
                "syn_sent_fanout", "critical", n,
                f"connect fan-out: {who} tried {dests} distinct destinations ({ports} ports) "
                f"and {n} attempts failed or hang; scanner- or worm-like behaviour",
                "Check what this process is and why it connects to so many hosts; if it is not a "
                "known crawler or service discovery, treat the host as compromised.",
                netns=int(ns) if ns >= 0 else None, owner_pid=int(pid) if pid >= 0 else None,
                owner_comm=comm if pid >= 0 else None,
                rate_per_s=round(n / ev.duration_s, 3) if ev.duration_s > 0 else None,
                samples=list(g["_dest"].drop_duplicates().head(5)),
                evidence={"distinct_destinations": int(dests), "distinct_ports": int(ports)}))
    # per destination (there can be thousands): aggregated column-wise, one finding per row
    dest = ["_ns", "_dest"]
    rows = rows[rows.groupby(dest, sort=False)["n"].transform("sum") >= t.syn_sent_failures]
    if rows.empty:
        return out
    per = rows.groupby(dest + ["outcome"], sort=False)["n"].sum().unstack(fill_value=0)
    per = per.reindex(columns=["refused", "timeout", "pending"], fill_value=0)
    per["oldest"] = rows.groupby(dest, sort=False)["age_s"].max()
    aged = rows[rows["age_s"].notna()].sort_values("age_s", ascending=False, kind="stable").drop_duplicates(dest)
    aged = aged.set_index(dest)
    oldest_lower = aged["lower"].astype(bool).to_dict() if len(aged) else {}
    oldest_source = aged["source"].to_dict() if len(aged) else {}
    owners = (rows.groupby(dest + ["_pid", "_comm"])["n"].sum().reset_index()  # ties: lowest pid first
              .sort_values("n", ascending=False, kind="stable"))
    per["owners"] = owners.groupby(dest, sort=False).size()
    top = owners.groupby(dest, sort=False).head(5)
    top = top.assign(p=top["_pid"].astype(str) + "/" + top["_comm"])
    per["processes"] = top.groupby(dest, sort=False)["p"].agg(list)
    first = owners.drop_duplicates(dest).set_index(dest)
    per["pid"], per["comm"] = first["_pid"], first["_comm"]
    per = per.reindex(rows[dest].drop_duplicates().set_index(dest).index)  # in order of appearance
    for (ns, dest_), refused, timeout, pending, oldest, n_owners, processes, pid, comm in per.itertuples(name=None):
        if (ns, pid, comm) in fanned and n_owners == 1:
            continue  # part of a fan-out finding already
        refused, timeout, pending = int(refused), int(timeout), int(pending)
        failures = refused + timeout
        rate = failures / ev.duration_s if ev.duration_s > 0 else None
        parts = [f"{x} {name}" for x, name in ((refused, "refused"), (timeout, "timed out"),
                                               (pending, "still in SYN_SENT")) if x]
        cause = ("nothing listens there (RST)" if refused and not (timeout or pending)
                 else "no answer: destination down, filtered or unroutable")
        n = refused + timeout + pending
        sev = "critical" if n >= t.pile_critical or (rate or 0) >= 10 else "warning"
        lower = bool(oldest_lower.get((ns, dest_), False))
        age = f"; oldest {'>=' if lower else ''}{oldest:.1f}s" if pending and not pd.isna(oldest) else ""
        out.append(Finding(
            "syn_sent_storm", sev, n,
            f"SYN_SENT storm to {dest_}: {', '.join(parts)}{age}; {cause}",
            "Check the destination service and the route/firewall to it; make clients back off "
            "(exponential retry with jitter) instead of hammering a dead endpoint.",
            netns=int(ns) if ns >= 0 else None, owner_pid=int(pid) if pid >= 0 else None,
            owner_comm=comm if pid >= 0 else None, peer=dest_, rate_per_s=None if rate is None else round(rate, 3),
            oldest_age_s=_float(oldest), age_lower_bound=lower,
            evidence={"refused": refused, "timed_out": timeout, "pending": pending, "processes": processes,
                      "age_source": oldest_source.get((ns, dest_))}))
    return out


_FLOOD_MIBS = ("SyncookiesSent", "TCPReqQFullDoCookies", "TCPReqQFullDrop", "ListenOverflows",
               "ListenDrops")


def syn_floods(ev: Evidence, t: Thresholds) -> list[Finding]:
    """Half-open handshakes on a listener, and the kernel's own overflow counters."""
    s = ev.sockets
    lis = s[s["state"] == "LISTEN"]
    reqs = s[(s["state"] == "SYN_RECV") & (s["inode"] == 0)]
    out = []
    flagged_ns = set()
    groups = {(int(ns), int(port)): g for (ns, port), g in reqs.groupby(["netns", "lport"])} if len(reqs) else {}
    for key in sorted(set(groups) | set(ev.synack)):
        ns, port = key
        g = groups.get(key, reqs.iloc[:0])
        retrans, distinct_req = ev.synack.get(key, (0, 0))
        deltas = ev.counter_deltas.get(ns, {})
        dropped = {k: deltas.get(k, 0) for k in _FLOOD_MIBS if deltas.get(k, 0)}
        half_open = max(len(g), distinct_req)
        if half_open < t.syn_recv_per_listener and not (dropped and len(g)):
            continue
        flagged_ns.add(ns)
        owner = lis[(lis["netns"] == ns) & (lis["lport"] == port)]
        pid = _int(owner["owner_pid"].iloc[0]) if len(owner) else None
        comm = owner["owner_comm"].iloc[0] if len(owner) and pid is not None else None
        laddr = owner["laddr"].iloc[0] if len(owner) else (g["laddr"].iloc[0] if len(g) else "*")
        local = endpoint(laddr, port)
        sources = int(g["raddr"].nunique())
        backlog = _int(owner["wqueue"].iloc[0]) if len(owner) else None
        sev = "critical" if dropped else "warning"
        summary = f"SYN flood on {local}: {half_open} half-open handshakes"
        if len(g):
            summary += f" ({len(g)} pending now, from {sources} source{'s' if sources != 1 else ''})"
        if retrans:
            summary += f", {retrans} SYN-ACK retransmits"
        cover = ev.counter_scope.get(ns, [])
        if dropped:
            summary += "; kernel " + ", ".join(f"{k} +{v}" for k, v in dropped.items()) + _shared(cover)
        out.append(Finding(
            "syn_flood", sev, half_open, summary,
            "Keep net.ipv4.tcp_syncookies=1, lower net.ipv4.tcp_synack_retries to shorten the 30 s - "
            "2 min life of each half-open entry, raise the listen backlog (and net.core.somaxconn, "
            "net.ipv4.tcp_max_syn_backlog); filter the sources upstream if they are spoofed.",
            netns=ns, owner_pid=pid, owner_comm=comm, local=local,
            rate_per_s=round(retrans / ev.duration_s, 3) if retrans and ev.duration_s > 0 else None,
            samples=[f"{endpoint(r.raddr, r.rport)} synack_retrans={int(r.retrans)}" if hasattr(r, "retrans")
                     else endpoint(r.raddr, r.rport) for r in g.head(5).itertuples()],
            evidence={"half_open": half_open, "pending_now": len(g), "distinct_sources": sources,
                      "synack_retransmits": retrans, "backlog": backlog, "counters": dropped,
                      "counters_cover": cover[:20] if dropped else [],
                      "sysctls": {k: v for k, v in ev.sysctls.get(ns, {}).items()
                                  if k in ("tcp_syncookies", "tcp_synack_retries", "tcp_max_syn_backlog",
                                           "somaxconn")}}))
    # counters without visible request sockets (cookies leave no socket): one finding per netns
    for ns, deltas in ev.counter_deltas.items():
        dropped = {k: deltas.get(k, 0) for k in _FLOOD_MIBS if deltas.get(k, 0)}
        if not dropped or ns in flagged_ns:
            continue
        full = lis[(lis["netns"] == ns) & (lis["rqueue"] > 0) & (lis["rqueue"] >= lis["wqueue"])]
        cover = ev.counter_scope.get(int(ns), [])
        if full.empty and not any(k.startswith(("Syncookies", "TCPReqQ")) for k in dropped):
            local = None
            summary = "listen queue overflows: " + ", ".join(f"{k} +{v}" for k, v in dropped.items())
        else:
            local = ", ".join(endpoint(a, p) for a, p in zip(full["laddr"], full["lport"])) or None
            summary = ("listen queue overflow" + (f" on {local}" if local else "") + ": "
                       + ", ".join(f"{k} +{v}" for k, v in dropped.items()))
        summary += _shared(cover)
        # the owner: of the listener whose queue is full now, else of the namespace's only listener
        # (with several, the counters cannot say whose they are)
        suspects = full if len(full) or len(cover) > 1 else lis[lis["netns"] == ns]
        known = suspects[suspects["owner_pid"].notna()]
        pid = comm = None
        if len(known) and known["owner_pid"].nunique() == 1:
            pid, comm = int(known["owner_pid"].iloc[0]), known["owner_comm"].iloc[0]
        out.append(Finding(
            "listen_overflow", "critical" if sum(dropped.values()) >= t.pile_critical else "warning",
            int(sum(dropped.values())), summary,
            "Connections were dropped or answered with SYN cookies because an accept or SYN queue was "
            "full: the application does not accept() fast enough, or the backlog is too small "
            "(listen() backlog, net.core.somaxconn), or this is a SYN flood.",
            netns=int(ns), owner_pid=pid, owner_comm=comm, local=local,
            samples=[f"{endpoint(r.laddr, r.lport)} LISTEN queue={int(r.rqueue)}/{int(r.wqueue)}"
                     + ("" if pd.isna(r.owner_pid) else f" pid={int(r.owner_pid)} ({r.owner_comm})")
                     for r in suspects.head(5).itertuples()],
            evidence={"counters": dropped, "counters_cover": cover[:20]}))
    return out


def _shared(cover: list[str]) -> str:
    """What per-namespace counters cover, when more than one listener shares them."""
    if len(cover) <= 1:
        return ""
    names = ", ".join(cover[:3]) + (", ..." if len(cover) > 3 else "")
    return f" (counters of the whole network namespace, shared by its {len(cover)} listeners: {names})"


def _time_wait_rows(ev: Evidence) -> pd.DataFrame:
    """Active closes (ended) and TIME_WAIT sockets (now) on one footing: the client side is
    keyed by the destination it connects to, the server side by its own port."""
    lis = _listener_ports(ev.sockets)
    closes = ev.ended[ev.ended["time_wait"].astype(bool)]
    tw = ev.sockets[ev.sockets["state"] == "TIME_WAIT"]
    parts = []
    if len(closes):
        client = (closes["role"] == "active").to_numpy()
        parts.append(pd.DataFrame({
            "netns": closes["netns"].to_numpy(), "client": client,
            "addr": np.where(client, closes["raddr"].astype(object), closes["laddr"].astype(object)),
            "port": np.where(client, closes["rport"].astype("float64"), closes["lport"].astype("float64")),
            "closed": _weights(closes), "held": 0, "ephemeral_lport": closes["lport"].astype("float64").to_numpy(),
            "owner_pid": closes["owner_pid"].astype("float64").to_numpy(),
            "owner_comm": closes["owner_comm"].astype(object).to_numpy()}))
    if len(tw):
        client = np.array([(n, p) not in lis for n, p in zip(tw["netns"], tw["lport"])], dtype=bool)
        parts.append(pd.DataFrame({
            "netns": tw["netns"].to_numpy(), "client": client,
            "addr": np.where(client, tw["raddr"].astype(object), tw["laddr"].astype(object)),
            "port": np.where(client, tw["rport"].astype("float64"), tw["lport"].astype("float64")),
            "closed": 0, "held": 1, "ephemeral_lport": tw["lport"].astype("float64").to_numpy(),
            "owner_pid": tw["owner_pid"].astype("float64").to_numpy(),
            "owner_comm": tw["owner_comm"].astype(object).to_numpy()}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def time_wait_churn(ev: Evidence, t: Thresholds) -> list[Finding]:
    """Active closes per destination (client side) or per own port (server side), and how much
    of the ephemeral port range TIME_WAIT holds on the client side."""
    rows = _time_wait_rows(ev)
    if rows.empty:
        return []
    span_of = {ns: ev.sysctls.get(int(ns), {}).get("ip_local_port_range", (32768, 60999))
               for ns in rows["netns"].dropna().unique()}
    lo = rows["netns"].map({ns: r[0] for ns, r in span_of.items()}).fillna(32768).astype("float64")
    hi = rows["netns"].map({ns: r[1] for ns, r in span_of.items()}).fillna(60999).astype("float64")
    rows["in_range"] = (rows["held"] == 1) & (rows["ephemeral_lport"] >= lo) & (rows["ephemeral_lport"] <= hi)
    keys = ["netns", "client", "addr", "port"]
    agg = rows.groupby(keys, sort=False, dropna=False).agg(
        closed=("closed", "sum"), held=("held", "sum"), in_range=("in_range", "sum")).reset_index()
    span = agg["netns"].map({ns: r[1] - r[0] + 1 for ns, r in span_of.items()}).fillna(60999 - 32768 + 1)
    span = span.astype("float64")
    per_s = agg["closed"] / ev.duration_s if ev.duration_s > 0 else agg["closed"] * 0.0
    steady = per_s * TIME_WAIT_S
    now = agg["in_range"] if ev.complete_snapshot else np.minimum(agg["closed"], steady)
    client = agg["client"].astype(bool)
    agg["use_now"] = np.where(client, now / span, 0.0)
    agg["use_steady"] = np.where(client, steady / span, 0.0)
    agg["per_s"], agg["span"] = per_s, span
    flagged = agg[(np.maximum(agg["use_now"], agg["use_steady"]) >= t.time_wait_use) | (per_s >= t.time_wait_rate)]
    out = []
    for r in flagged.itertuples(index=False):
        ns, client, addr, port = r.netns, bool(r.client), r.addr, r.port
        n_closed, n_held, per_s = int(r.closed), int(r.held), float(r.per_s)
        use_now, use_steady, span = float(r.use_now), float(r.use_steady), int(r.span)
        ctl = ev.sysctls.get(int(ns), {}) if not pd.isna(ns) else {}
        lo, hi = span_of.get(ns, (32768, 60999))
        left = None
        if client and per_s > 0 and per_s * TIME_WAIT_S > span:
            left = max(0.0, span * (1 - use_now) / per_s)
        g = rows[(rows["netns"] == ns) & (rows["client"] == client) & (rows["addr"] == addr) & (rows["port"] == port)]
        use = max(use_now, use_steady)
        sev = "critical" if use >= 0.9 else "warning" if use >= t.time_wait_use else "info"
        where = endpoint(addr, int(port))
        if client:
            summary = (f"TIME_WAIT churn to {where}: {per_s:.1f} closes/s; TIME_WAIT holds {use_now:.0%} of "
                       f"the {span} ephemeral ports ({lo}-{hi}), {use_steady:.0%} at this rate")
            if left is not None:
                summary += f"; ports run out in ~{left:.0f}s (connect() then fails with EADDRNOTAVAIL)"
        else:
            summary = (f"TIME_WAIT churn on {where}: {per_s:.1f} closes/s by this server closing first "
                       "(memory and CPU, not ports: clients use their own)")
        reuse = ctl.get("tcp_tw_reuse")
        advice = ("Reuse connections (HTTP keep-alive, connection pools) instead of one connection per "
                  "request; for outgoing connections net.ipv4.tcp_tw_reuse=1 lets connect() take a "
                  f"TIME_WAIT port (now {'unknown' if reuse is None else reuse}); widen "
                  "net.ipv4.ip_local_port_range; net.ipv4.tcp_max_tw_buckets caps TIME_WAIT sockets. "
                  "(tcp_tw_recycle no longer exists since Linux 4.12.)")
        owners = g.dropna(subset=["owner_pid"]).groupby(["owner_pid", "owner_comm"])["closed"].sum()
        pid = comm = None
        if len(owners):
            pid, comm = owners.sort_values(ascending=False).index[0]
            pid = int(pid)
        out.append(Finding(
            "time_wait_churn", sev, max(n_closed, n_held), summary, advice, netns=_int(ns),
            owner_pid=pid, owner_comm=comm, local=None if client else where, peer=where if client else None,
            rate_per_s=round(per_s, 3),
            evidence={"closed_into_time_wait": n_closed, "time_wait_now": n_held, "client_side": bool(client),
                      "port_range": [lo, hi], "port_use_now": round(use_now, 4),
                      "port_use_steady": round(use_steady, 4),
                      "seconds_to_exhaustion": None if left is None else round(left, 1),
                      "tcp_tw_reuse": reuse, "tcp_max_tw_buckets": ctl.get("tcp_max_tw_buckets")}))
    return out


def idle_established(ev: Evidence, t: Thresholds) -> list[Finding]:
    """ESTABLISHED with no data either way for long and no keepalive: peers that may be gone;
    and one peer holding very many connections (a reconnect loop)."""
    s = ev.sockets
    est = s[s["state"] == "ESTABLISHED"]
    out = []
    idle = est[(est["idle_recv_s"] >= t.idle_established_s) & (est["idle_sent_s"] >= t.idle_established_s)
               & (est["timer"] != "keepalive")]
    for (ns, raddr), g in _owner_key(idle).groupby(["netns", "raddr"], sort=False) if len(idle) else []:
        n = len(g)
        out.append(Finding(
            "idle_established", _pile_severity(n, t), n,
            f"{n} ESTABLISHED connection{'s' if n > 1 else ''} to {raddr} idle for "
            f">= {g[['idle_recv_s', 'idle_sent_s']].min(axis=1).max():.0f}s with keepalive off: "
            "the peer may have vanished without a FIN",
            "Enable SO_KEEPALIVE (and tune tcp_keepalive_time/intvl/probes) or an application-level "
            "heartbeat so dead peers are detected and the sockets freed.",
            netns=_int(ns), owner_pid=_int(g["_pid"].iloc[0]) if g["_pid"].iloc[0] >= 0 else None,
            owner_comm=g["_comm"].iloc[0] if g["_pid"].iloc[0] >= 0 else None, peer=str(raddr),
            samples=_samples(g)))
    held = s[s["state"].isin(["ESTABLISHED", "CLOSE_WAIT"])]
    if len(held):
        lis = _listener_ports(s)
        inbound = held[np.array([(n, p) in lis for n, p in zip(held["netns"], held["lport"])], dtype=bool)]
        sizes = inbound.groupby(["netns", "raddr"], sort=False).size()
        big = set(sizes[sizes >= t.peer_connections].index)
        inbound = inbound[np.array([k in big for k in zip(inbound["netns"], inbound["raddr"])], dtype=bool)]
        for (ns, raddr), g in inbound.groupby(["netns", "raddr"], sort=False):
            cw = int((g["state"] == "CLOSE_WAIT").sum())
            owners = g["owner_pid"].dropna()
            pid = int(owners.mode().iloc[0]) if len(owners) else None  # the process serving most of them
            comm = g.loc[g["owner_pid"] == pid, "owner_comm"].iloc[0] if pid is not None else None
            out.append(Finding(
                "peer_connection_pile", "warning", len(g),
                f"{raddr} holds {len(g)} connections to our listeners ({cw} in CLOSE_WAIT): "
                "a client in a reconnect loop, or a connection-pool leak on its side",
                "Find the client and why it opens new connections without closing old ones; cap "
                "connections per source (the service's own limit, or a firewall connlimit).",
                netns=_int(ns), owner_pid=pid, owner_comm=comm, peer=str(raddr), samples=_samples(g),
                evidence={"established": len(g) - cw, "close_wait": cw,
                          "processes": int(owners.nunique())}))
    return out


def new_listeners(ev: Evidence, t: Thresholds) -> list[Finding]:
    """A port that started listening while we watched: worth knowing who opened it."""
    nl = ev.new_listeners
    if nl is None or nl.empty:
        return []
    out = []
    for r in nl.itertuples():
        pid = _int(r.owner_pid)
        who = f"pid {pid} ({r.owner_comm})" if pid is not None else "an unknown process"
        local = endpoint(r.laddr, r.lport)
        out.append(Finding(
            "new_listener", "info", 1, f"new listener on {local} opened by {who} during the trace",
            "Expected after a deploy or restart; otherwise find out what it is (a backdoor listens too).",
            netns=_int(r.netns), owner_pid=pid, owner_comm=r.owner_comm if pid is not None else None,
            local=local))
    return out


# -- the ended connections' health, per peer (issue 15): the detectors read PeerTally's frames
# (analysis/evidence.py; Evidence.ended_health, Evidence.ended_times)

def _peer_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """A tally frame with its peer as group keys: _ns (-1: unknown), _peer ("?": unknown)."""
    return frame.assign(_ns=pd.to_numeric(frame["netns"]).astype("Float64").fillna(-1).astype("int64"),
                        _peer=frame["raddr"].fillna("?").astype(str))


def _per_peer(ev: Evidence) -> pd.DataFrame:
    """Evidence.ended_health summed per (netns, raddr)."""
    h = ev.ended_health
    if h is None or h.empty:
        return pd.DataFrame()
    return _peer_keys(h).groupby(["_ns", "_peer"], sort=False)[list(TALLY_COUNTS)].sum()


def _peer_owner(ev: Evidence, ns: int, peer: str, column: str) -> tuple[int | None, str | None]:
    """The owner with the most `column` among the peer's connections (None: unknown)."""
    h = _peer_keys(ev.ended_health)
    rows = h[(h["_ns"] == ns) & (h["_peer"] == peer) & h["owner_pid"].notna()]
    rows = rows[rows[column] > 0]
    if rows.empty:
        return None, None
    r = rows.sort_values([column, "owner_pid"], ascending=[False, True], kind="stable").iloc[0]
    return int(r["owner_pid"]), r["owner_comm"]


def retransmit_storms(ev: Evidence, t: Thresholds) -> list[Finding]:
    """Many ended connections to one peer re-sent data, or many segments re-sent to it, and a
    real share of what was sent to it."""
    per = _per_peer(ev)
    if per.empty:
        return []
    share = np.where(per["share_sent"] > 0, per["share_resent"] / per["share_sent"].clip(lower=1), np.nan)
    per = per.assign(_share=share)
    hit = ((per["retransmitting"] >= t.retrans_storm_connections) | (per["resent"] >= t.retrans_storm_segments)) \
        & (per["resent"] > 0) & (per["_share"].isna() | (per["_share"] >= t.retrans_storm_share))
    out = []
    for (ns, peer), r in per[hit].iterrows():
        conns, resending, resent = int(r["connections"]), int(r["retransmitting"]), int(r["resent"])
        share = None if np.isnan(r["_share"]) else float(r["_share"])
        pid, comm = _peer_owner(ev, ns, peer, "retransmitting")
        summary = (f"retransmit storm to {peer}: {resending} of the {conns} connections that ended re-sent "
                   f"data, {resent} segments in all"
                   + (f" ({share:.1%} of the data segments sent to it)" if share is not None else ""))
        if r["losses"]:
            summary += f"; {int(r['losses'])} retransmit timeouts"
        if r["died"]:
            summary += f"; {int(r['died'])} died after it"
        sev = "critical" if (share or 0) >= 0.1 or resending >= t.pile_critical else "warning"
        out.append(Finding(
            "retransmit_storm", sev, resending, summary,
            "Packets to or from this peer are being lost: check the interfaces on both ends for errors "
            "and drops (ip -s link), the path (a congested or flapping link, a path MTU black hole that "
            "drops only large segments) and the peer's load (a full receive queue drops too); "
            "`ss -ti dst ADDR` shows the connections still open and their retransmits.",
            netns=None if ns < 0 else int(ns), owner_pid=pid, owner_comm=comm, peer=peer,
            rate_per_s=round(resent / ev.duration_s, 3) if ev.duration_s > 0 else None,
            evidence={"connections": conns, "retransmitting": resending, "segments_resent": resent,
                      "share_resent": None if share is None else round(share, 4),
                      "retransmit_timeouts": int(r["losses"]), "syn_retransmits": int(r["syn_retransmits"]),
                      "died": int(r["died"])}))
    return out


def _medians(times: pd.DataFrame, metric: str, min_samples: int) -> pd.DataFrame:
    """Per (netns, raddr) with at least min_samples: samples and the median of the metric's
    histogram (the middle sample's bucket value)."""
    m = times[times["metric"] == metric]
    if m.empty:
        return pd.DataFrame(columns=["samples", "median_ms"])
    peer = ["_ns", "_peer"]
    m = _peer_keys(m).groupby(peer + ["bucket"], sort=True)["n"].sum().reset_index()
    total = m.groupby(peer, sort=False)["n"].transform("sum")
    m, total = m[total >= min_samples], total[total >= min_samples]
    if m.empty:
        return pd.DataFrame(columns=["samples", "median_ms"])
    cum = m.groupby(peer, sort=False)["n"].cumsum()
    mid = m[cum >= (total + 1) / 2].groupby(peer, sort=False).head(1)
    return pd.DataFrame({"samples": total[mid.index].to_numpy(), "median_ms": bucket_ms(mid["bucket"].to_numpy())},
                        index=pd.MultiIndex.from_frame(mid[peer]))


_SLOW = {
    "handshake_ms": ("handshake",
                     "Handshakes this slow mean SYNs or SYN-ACKs lost and re-sent (the first retry waits "
                     "1 s, then 3 s, 7 s), a listener whose SYN queue is full, or a long path: compare "
                     "with the peer's RTT, check the route and the peer's listen backlog."),
    "rtt_ms": ("RTT at close",
               "The path to this peer is long or queueing (bufferbloat on a congested link), or the peer "
               "answers slowly (a loaded host, delayed ACKs): check the route (mtr) and whether the "
               "RTT grew recently; `ss -ti dst ADDR` shows it for the connections still open."),
}


def _ms(v: float) -> str:
    """Milliseconds as people read them: 1003, 12.4, 0.0476."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _median_of_the_others(values: np.ndarray) -> np.ndarray:
    """For each value, the median of all the others (at least two values)."""
    order = np.argsort(values, kind="stable")
    vs = values[order]
    j = np.empty(len(vs), dtype=np.int64)
    j[order] = np.arange(len(vs))       # each value's place in the sorted ones
    n = len(vs) - 1                     # the others

    def nth(k):                         # the others' k-th smallest: skip the value itself
        return np.where(k < j, vs[k], vs[np.minimum(k + 1, len(vs) - 1)])
    return (nth((n - 1) // 2) + nth(n // 2)) / 2


def slow_peers(ev: Evidence, t: Thresholds) -> list[Finding]:
    """A peer whose median handshake (or RTT at close) stands far above the median of the
    other peers' medians, each with enough samples that jitter cannot do it."""
    if ev.ended_times is None or ev.ended_times.empty:
        return []
    out = []
    for metric, (what, advice) in _SLOW.items():
        med = _medians(ev.ended_times, metric, t.slow_peer_samples)
        if len(med) < t.slow_peer_others + 1:
            continue
        rest = _median_of_the_others(med["median_ms"].to_numpy())
        for ((ns, peer), r), others in zip(med.iterrows(), rest.tolist()):
            mine = float(r["median_ms"])
            if mine < t.slow_peer_factor * others or mine - others < t.slow_peer_excess_ms:
                continue
            ratio = mine / others if others > 0 else float("inf")
            pid, comm = _peer_owner(ev, ns, peer, "connections")
            n = int(r["samples"])
            kw = dict(netns=None if ns < 0 else int(ns), owner_pid=pid, owner_comm=comm, peer=peer,
                      evidence={"metric": metric, "median_ms": round(mine, 3),
                                "others_median_ms": round(others, 3), "samples": n, "peers_compared": len(med)})
            args = ("warning" if ratio >= 10 else "info", n,
                    f"slow peer {peer}: median {what} {_ms(mine)} ms over {n} connections, {ratio:.0f}x the "
                    f"median of the other {len(med) - 1} peers ({_ms(others)} ms)", advice)
            out.append(Finding("slow_peer_handshake", *args, **kw) if metric == "handshake_ms"
                       else Finding("slow_peer_rtt", *args, **kw))
    return out


def retransmit_deaths(ev: Evidence, t: Thresholds) -> list[Finding]:
    """Established connections that timed out, or were reset or aborted after re-sending
    data or a retransmit timeout: per peer."""
    per = _per_peer(ev)
    if per.empty:
        return []
    out = []
    for (ns, peer), r in per[per["died"] >= t.retrans_deaths].iterrows():
        died = int(r["died"])
        parts = [f"{int(r[c])} {name}" for c, name in (("timed_out", "timed out"), ("reset", "reset by the peer"),
                                                        ("aborted", "aborted here")) if r[c]]
        pid, comm = _peer_owner(ev, ns, peer, "died")
        out.append(Finding(
            "retransmit_deaths", "critical" if died >= t.pile_critical else "warning", died,
            f"{died} connections with {peer} died after retransmitting: {', '.join(parts)} "
            f"(of {int(r['connections'])} that ended)",
            "The peer stopped answering in the middle of connections (it crashed or rebooted, a NAT or "
            "firewall dropped the flows' state, the path broke) and the retransmissions went unanswered "
            "until the kernel gave up (net.ipv4.tcp_retries2, TCP_USER_TIMEOUT) or someone reset; check "
            "the peer and the stateful devices on the way. An application that aborts connections "
            "stuck retransmitting shows here too.",
            netns=None if ns < 0 else int(ns), owner_pid=pid, owner_comm=comm, peer=peer,
            rate_per_s=round(died / ev.duration_s, 3) if ev.duration_s > 0 else None,
            evidence={"timed_out": int(r["timed_out"]), "reset_by_peer": int(r["reset"]),
                      "aborted": int(r["aborted"]), "connections": int(r["connections"]),
                      "segments_resent": int(r["resent"]), "retransmit_timeouts": int(r["losses"])}))
    return out


DETECTORS = (close_wait_leaks, close_piles, syn_sent_storms, syn_floods, time_wait_churn,
             idle_established, new_listeners, retransmit_storms, slow_peers, retransmit_deaths)


def find(ev: Evidence, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every detector's findings, most severe and largest first."""
    t = thresholds or Thresholds()
    out: list[Finding] = []
    for detector in DETECTORS:
        out += detector(ev, t)
    out.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.count, f.kind))
    return out


FRAME_COLUMNS = [f.name for f in fields(Finding) if f.name not in _RUN_FIELDS]


def frame(findings: list[Finding]) -> pd.DataFrame:
    """Findings as a DataFrame (the `.leaks()` schema)."""
    df = pd.DataFrame([{k: v for k, v in f.as_dict().items() if k in FRAME_COLUMNS} for f in findings],
                      columns=FRAME_COLUMNS)
    df["severity"] = pd.Categorical(df["severity"], categories=SEVERITIES, ordered=True)
    for c in ("count", "netns", "owner_pid"):
        df[c] = df[c].astype("Int64")
    for c in ("rate_per_s", "oldest_age_s"):
        df[c] = df[c].astype("float64")
    df["age_lower_bound"] = df["age_lower_bound"].astype(bool)
    for c in ("kind", "summary", "advice", "owner_comm", "local", "peer", "samples", "evidence"):
        df[c] = df[c].astype(object)  # the same dtype whether or not a finding has the field
    return df
