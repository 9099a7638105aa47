"""--cgroup PATH and --container ID on the real kernel: two cgroups the test creates (and a
container's, shaped as docker's systemd driver names it), servers and clients moved into them,
one pair inside a network namespace the test creates. Traced with the filter, every connection
whose owner is in the chosen cgroup (or below it) appears, with that cgroup, and none other:
not the other cgroup's clients, nor the sockets the other cgroup's server accepted from the
chosen one's clients (an accepted socket's owner is its listener's, then its own task's).
Bad input: one error line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from pyroute2 import NetNS, netns

from tcplife_trace import containers
from tcplife_trace.cli import main
from tcplife_trace.probes import program as prog
from tcplife_trace.probes.filters import Filters

from test_cli import EXE, traced as cli_traced
from tracing import Traced

pytestmark = pytest.mark.privileged

TOP = "/tlt-h2-cgfilter"  # everything this test creates in the cgroup tree is below it
CID = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"
NS = "tlth2cg"

# a process that moves itself into a cgroup, then serves or connects; it prints its ports
PEER = r"""
import os, socket, sys
cgroup, role = sys.argv[1], sys.argv[2]
if cgroup != "-":  # ("-": moved in before it entered its namespace, whose /sys has no cgroup2)
    with open(cgroup + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
if role == "server":
    lis = socket.create_server((sys.argv[3], 0))
    print(lis.getsockname()[1], flush=True)
    while True:
        a, _ = lis.accept()
        a.recv(5)
        a.sendall(b"world")
        a.close()
host, port, n = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ports = []
for _ in range(n):
    c = socket.create_connection((host, port), timeout=5)
    c.sendall(b"hello")
    c.recv(5)
    ports.append(c.getsockname()[1])
    c.close()
print(" ".join(map(str, ports)), flush=True)
"""


@pytest.fixture
def tree():
    m = containers.cgroup2_mount()
    assert m is not None, "no cgroup2 on this host"
    paths = {"a": TOP + "/a", "b": TOP + "/b", "docker": TOP + "/system.slice/docker-%s.scope" % CID}
    for p in paths.values():
        os.makedirs(m + p, exist_ok=True)
    yield m, paths
    for here, _dirs, _ in os.walk(m + TOP, topdown=False):
        for _ in range(50):  # (a process moved in leaves its cgroup when it is reaped)
            try:
                os.rmdir(here)
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def space():
    if NS in netns.listnetns():
        netns.remove(NS)
    netns.create(NS)
    with NetNS(NS) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
    yield os.stat(f"/run/netns/{NS}").st_ino
    netns.remove(NS)


def _peer(mount: str, cgroup: str, in_ns: bool, *args: str) -> list[str]:
    """The command of a peer in this cgroup (and the namespace: the shell moves itself into the
    cgroup, then becomes `ip netns exec`, then the peer)."""
    if not in_ns:
        return [sys.executable, "-c", PEER, mount + cgroup, *args]
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec ip netns exec "$@"', mount + cgroup,
            NS, sys.executable, "-c", PEER, "-", *args]


def _server(mount: str, cgroup: str, in_ns: bool = False) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(_peer(mount, cgroup, in_ns, "server", "127.0.0.1"), stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def _clients(mount: str, cgroup: str, port: int, n: int, in_ns: bool = False) -> list[int]:
    """n connections from a client in this cgroup (and the namespace): its local ports."""
    out = subprocess.run(_peer(mount, cgroup, in_ns, "client", "127.0.0.1", str(port), str(n)),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [int(x) for x in out.split()]


class Workload:
    """Servers in a and b (b's in the namespace), clients of a and b to each, 3 connections each."""

    def __init__(self, mount, paths):
        self.mount, self.paths = mount, paths
        self.servers = []

    def run(self):
        m, p = self.mount, self.paths
        srv_a, self.port_a = _server(m, p["a"])
        srv_b, self.port_b = _server(m, p["b"], in_ns=True)
        self.servers = [srv_a, srv_b]
        self.a_to_a = _clients(m, p["a"], self.port_a, 3)
        self.b_to_a = _clients(m, p["b"], self.port_a, 3)
        self.a_to_b = _clients(m, p["a"], self.port_b, 3, in_ns=True)  # (inside the namespace)
        self.b_to_b = _clients(m, p["b"], self.port_b, 3, in_ns=True)
        return self

    def stop(self):
        for s in self.servers:
            s.kill()
            s.wait()

    def in_a(self) -> set[tuple[int, int]]:
        """(lport, rport) of every socket owned in a: a's clients, and what a's server accepted."""
        return ({(c, self.port_a) for c in self.a_to_a} | {(c, self.port_b) for c in self.a_to_b}
                | {(self.port_a, c) for c in self.a_to_a + self.b_to_a})

    def not_in_a(self) -> set[tuple[int, int]]:
        return ({(c, self.port_a) for c in self.b_to_a} | {(c, self.port_b) for c in self.b_to_b}
                | {(self.port_b, c) for c in self.a_to_b + self.b_to_b})


def _ends(lcs) -> set[tuple[int, int]]:
    return {(lc.lport, lc.rport) for lc in lcs}


@pytest.mark.parametrize("mode", ["stream", "aggregate"])
def test_the_chosen_cgroups_connections_and_no_other(tree, space, mode):
    mount, paths = tree
    filters = Filters(cgroups=containers.targets([paths["a"]]))
    a_id = os.stat(mount + paths["a"]).st_ino
    pairs = set()  # (sport, dport) of every event that reached user space (stream mode)
    t = Traced(prog.Settings(filters=filters, mode=mode),
               on_batch=lambda ev: pairs.update(zip(ev["sport"].tolist(), ev["dport"].tolist())))
    w = Workload(mount, paths)
    try:
        w.run()
        want = w.in_a()
        assert t.wait_for(lambda: want <= _ends(t.closed), 15), want - _ends(t.closed)
        for _ in range(5):
            t.session.poll(30)
    finally:
        w.stop()
        report = t.stop()
    seen = _ends(t.closed) | _ends(t.session.still_open)
    assert not seen & w.not_in_a(), seen & w.not_in_a()
    assert {lc.cgroup_id for lc in t.closed if (lc.lport, lc.rport) in want} == {a_id}
    # nothing but a's: every connection reported is owned in a (the test's own are not)
    assert {lc.cgroup_id for lc in t.closed} == {a_id}, {lc.cgroup_id for lc in t.closed}
    ns = {lc.netns for lc in t.closed if (lc.lport, lc.rport) in {(c, w.port_b) for c in w.a_to_b}}
    assert ns == {space}
    if mode == "stream":  # every transition shown is of a connection owned in a, its home on it
        assert t.transitions and {tr.lc.cgroup_id for tr in t.transitions} == {a_id}
        shown = {(tr.lc.lport, tr.lc.rport) for tr in t.transitions}
        assert want <= shown and not shown & w.not_in_a()
    assert report["filters"] == f"cgroup {paths['a']}"
    # the sockets b's tasks connected or listened with never left the kernel; those b's server
    # accepted did (an accepted socket's owner is not known at SYN_RECV), and user space dropped them
    if mode == "stream":
        assert want <= pairs and not pairs & ({(c, w.port_a) for c in w.b_to_a} | {(c, w.port_b) for c in w.b_to_b})
    assert report["filtered_out"] >= 6


def test_a_parent_cgroup_holds_its_children(tree, space):
    """--cgroup TOP: a's and b's connections both (the cgroups below it), in the kernel too."""
    mount, paths = tree
    t = Traced(prog.Settings(filters=Filters(cgroups=containers.targets([TOP])), mode="aggregate"))
    w = Workload(mount, paths)
    try:
        w.run()
        want = w.in_a() | w.not_in_a()
        assert t.wait_for(lambda: want <= _ends(t.closed), 15), want - _ends(t.closed)
    finally:
        w.stop()
        t.stop()
    ids = {os.stat(mount + paths[k]).st_ino for k in ("a", "b")}
    assert {lc.cgroup_id for lc in t.closed} == ids


def test_cli_container_json(tree):
    """tcplife-trace --container ID12 --json: the container's client's transitions, each with
    its cgroup and container id; b's client's none."""
    mount, paths = tree
    srv, port = _server(mount, paths["b"])
    got = {}

    def workload():
        got["docker"] = _clients(mount, paths["docker"], port, 3)
        got["b"] = _clients(mount, paths["b"], port, 3)
        time.sleep(0.5)
    try:
        rc, out, err, _ = cli_traced(["--container", CID[:12], "--json", "--duration", "4"], workload)
    finally:
        srv.kill()
        srv.wait()
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    conns = {r["conn_id"] for r in recs if r["rport"] == port and r["lport"] in got["docker"]}
    mine = [r for r in recs if r["conn_id"] in conns]  # (its SYN_SENT has no local port yet)
    assert len(conns) == 3 and len(mine) == 3 * 5  # (5 changes each)
    assert {(r["cgroup"], r["container_id"]) for r in recs} == {(paths["docker"], CID)}
    assert {r["cgroup_id"] for r in recs} == {os.stat(mount + paths["docker"]).st_ino}
    assert not [r for r in recs if r["lport"] in got["b"] or r["rport"] in got["b"]]
    summary = [line for line in err.splitlines() if "filters: container" in line]
    assert summary and f"container {CID[:12]}" in summary[0]


@pytest.mark.parametrize("cmd", [[], ["serve"], ["doctor"]])
def test_bad_cgroup_or_container_is_one_line_exit_2(tree, cmd, capsys):
    mount, paths = tree
    cases = [
        (["--cgroup", "/tlt-h2-no-such"], "cgroup /tlt-h2-no-such: no such cgroup under " + mount),
        (["--cgroup", paths["a"] + "/cgroup.procs"], "no such cgroup"),  # a file, not a cgroup
        (["--container", "0123456789ab"], "container 0123456789ab: no such container's cgroup"),
        (["--container", "abc"], "container abc: give its id, 12 to 64 lowercase hex digits"),
    ]
    for args, needle in cases:
        rc = main([*cmd, *args, "--duration", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("tcplife-trace: error: ") and needle in err[0], err


def test_an_ambiguous_container_prefix(tree):
    mount, paths = tree
    other = TOP + "/system.slice/docker-%s.scope" % (CID[:12] + "0" * 52)
    os.makedirs(mount + other)
    r = subprocess.run([EXE, "--container", CID[:12], "--duration", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the prefix of 2 containers' ids" in r.stderr
    assert {t.path for t in containers.targets(containers=[CID])} == {paths["docker"]}


def test_the_column_rule_is_the_live_rule_for_cgroups(tree):
    """Filters.match_columns against Filters.match with cgroup targets: a's id, a cgroup below
    a, b's, none (0), a cgroup id that names nothing; with a port filter beside it."""
    import numpy as np
    mount, paths = tree
    os.makedirs(mount + paths["a"] + "/below", exist_ok=True)
    ids = [os.stat(mount + paths["a"]).st_ino, os.stat(mount + paths["a"] + "/below").st_ino,
           os.stat(mount + paths["b"]).st_ino, 0, 1 << 62]
    for f in (Filters(cgroups=containers.targets([paths["a"]])),
              Filters(cgroups=containers.targets([paths["a"]]), lports=(80,))):
        cases = [(cg, lp) for cg in ids for lp in (80, 81)]
        got = f.match_columns(family=np.zeros(len(cases), int), lport=np.array([c[1] for c in cases]),
                              rport=np.zeros(len(cases), int), listener=np.zeros(len(cases), bool), owned=None,
                              cgroup_id=np.array([c[0] for c in cases], dtype=np.uint64))
        want = [f.match(family=None, lport=c[1], rport=None, role="active", owner_pids=(), cgroup_id=c[0])
                for c in cases]
        assert list(got) == want
        assert [f.cgroup_match(i) for i in ids] == [True, True, False, False, False]
    assert Filters(cgroups=containers.targets([paths["a"]])).describe() == f"cgroup {paths['a']}"
    assert Filters(cgroups=containers.targets(["/"])).cgroup_match(ids[2])  # the root holds every cgroup


# a process that moves itself into a cgroup, then leaks: it accepts N connections from its own
# clients, which close, and never closes them (CLOSE_WAIT); it prints its listener's port
LEAKER = r"""
import os, socket, sys, time
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
lis = socket.create_server(("127.0.0.1", 0))
held = []
for _ in range(int(sys.argv[2])):
    c = socket.create_connection(lis.getsockname(), timeout=5)
    held.append(lis.accept()[0])
    c.close()
print(lis.getsockname()[1], flush=True)
time.sleep(60)
"""


def test_the_detectors_look_at_the_chosen_cgroups_sockets_only(tree):
    """doctor --cgroup A: a CLOSE_WAIT leak in cgroup a is found, the same leak in cgroup b is
    not (the look at every socket is narrowed to the cgroup: a socket by the cgroup sock_diag
    gives it, its FIN_WAIT2 peers with no cgroup of their own by their owner from the trace);
    without the filter both are found."""
    mount, paths = tree
    procs = {k: subprocess.Popen([sys.executable, "-c", LEAKER, mount + paths[k], "12"], stdout=subprocess.PIPE,
                                 text=True) for k in ("a", "b")}
    try:
        ports = {k: int(p.stdout.readline()) for k, p in procs.items()}

        def leaks(args):
            r = subprocess.run([EXE, "doctor", "--duration", "0", "--json", "--threshold", "close_wait_age_s=0",
                                *args], capture_output=True, text=True, timeout=120)
            assert r.returncode in (0, 1), r.stderr
            found = json.loads(r.stdout)["findings"]
            return {f["owner_pid"] for f in found if f["kind"] == "close_wait_leak"}
        assert leaks(["--cgroup", paths["a"]]) & {procs["a"].pid, procs["b"].pid} == {procs["a"].pid}
        assert leaks(["--cgroup", paths["b"]]) & {procs["a"].pid, procs["b"].pid} == {procs["b"].pid}
        assert leaks([]) >= {procs["a"].pid, procs["b"].pid}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert ports["a"] != ports["b"]


def _pairs(lc) -> set[tuple[int, int]]:
    return set(zip(lc["lport"].fillna(0).astype(int), lc["rport"].fillna(0).astype(int)))


def test_analyze_applies_the_recorded_cgroup_filter_again(tree, space, tmp_path):
    """--cgroup A --record FILE: the recording also holds sockets the live session dropped in user
    space (those b's server accepted from a's clients: their owner is not known at SYN_RECV);
    loaded, its frames keep a's connections only, as the live trace did, by the cgroup paths the
    recording resolved; all_recorded=True shows what it holds."""
    from tcplife_trace import recording
    mount, paths = tree
    path = str(tmp_path / "cg.arrow")
    w = Workload(mount, paths)

    def workload():
        w.run()
        time.sleep(1.0)
    try:
        rc, out, err, _ = cli_traced(["--cgroup", paths["a"], "--record", path, "--duration", "6",
                                      "--lifecycles", "--json"], workload)
    finally:
        w.stop()
    assert rc == 0, err
    live = {(r["lport"], r["rport"]) for r in map(json.loads, out.splitlines()) if r.get("type") == "lifecycle"}
    assert w.in_a() <= live and not live & w.not_in_a()
    head = recording.read_header(path)
    assert head["filter_spec"]["cgroups"][0]["path"] == paths["a"]
    rec = recording.load(path)
    lc = rec.lifecycles()
    got = _pairs(lc)
    assert w.in_a() <= got and not got & w.not_in_a(), got & w.not_in_a()
    everything = recording.load(path, all_recorded=True).lifecycles()
    held = _pairs(everything)
    assert held & w.not_in_a()  # (so the filter above had something to drop)
    snaps = rec.snapshots()
    if len(snaps):  # the recorded looks, narrowed as the live look was
        ids = set(snaps["cgroup_id"].dropna().astype(int))
        assert ids <= {os.stat(mount + paths["a"]).st_ino}, ids
    r = subprocess.run([EXE, "analyze", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
