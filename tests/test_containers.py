"""Cgroups to containers and pods (tcplife_trace/containers.py), on the real kernel: cgroups the
test creates, named as docker, containerd (kubelet, systemd driver), cri-o, podman, the kubelet's
cgroupfs driver and a systemd service name them; a process moved into each makes real loopback
connections inside a network namespace the test creates; the kernel's own cgroup id of each
socket (sock_diag's INET_DIAG_CGROUP_ID, what bpf_get_current_cgroup_id() gives in the tracer)
must resolve to that cgroup, its container and pod, and that namespace."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pyroute2 import NetNS, netns

from tcplife_trace import containers
from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import proc_owners, sock_diag

pytestmark = pytest.mark.privileged

ID = "4f0c1d2e3b4a59687766554433221100ffeeddccbbaa99887766554433221100"
UID = "6b2a4c1e-93f0-4d1b-8a7e-0c5d3f2e1a90"
TOP = "/tlt-h-test"  # everything this test creates in the cgroup tree is below it

# (cgroup path below TOP, runtime, container id, pod uid)
SHAPES = [
    ("/system.slice/docker-%s.scope" % ID, "docker", ID, None),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope"
     % (UID.replace("-", "_"), ID), "containerd", ID, UID),
    ("/kubepods.slice/kubepods-pod%s.slice/crio-%s.scope" % (UID.replace("-", "_"), ID), "cri-o", ID, UID),
    ("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-%s.scope" % ID, "podman", ID, None),
    ("/kubepods/besteffort/pod%s/%s" % (UID, ID), "cri", ID, UID),
    ("/system.slice/nginx.service", "systemd service", None, None),
]

WORKLOAD = r"""
import socket, sys
print("ready", flush=True)
sys.stdin.readline()
lis = socket.create_server(("127.0.0.1", 0))
pairs = []
for _ in range(3):
    c = socket.create_connection(lis.getsockname())
    a, _ = lis.accept()
    c.sendall(b"hello")
    a.recv(5)
    pairs.append((c, a))
print("ok", lis.getsockname()[1], flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def mount():
    m = containers.cgroup2_mount()
    assert m is not None, "no cgroup2 on this host"
    yield m
    for here, dirs, _ in os.walk(m + TOP, topdown=False):
        os.rmdir(here)


@pytest.fixture
def space():
    name = "tlthcg"
    if name in netns.listnetns():
        netns.remove(name)
    netns.create(name)
    with NetNS(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
    yield netns_mod.Netns(os.stat(f"/run/netns/{name}").st_ino, f"/run/netns/{name}", name)
    netns.remove(name)


def _workload_in(mount: str, path: str, ns: netns_mod.Netns) -> subprocess.Popen:
    """The workload started in ns, moved into the cgroup, then let go: its sockets are made there."""
    os.makedirs(mount + path)
    p = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", WORKLOAD],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    with open(mount + path + "/cgroup.procs", "w") as f:
        f.write(str(p.pid))            # (ip netns exec execs: its pid is the workload's)
    p.stdin.write("go\n")
    p.stdin.flush()
    line = p.stdout.readline().split()
    assert line[0] == "ok", line
    return p


@pytest.mark.parametrize("shape", SHAPES, ids=[s[1] for s in SHAPES])
def test_connections_carry_their_cgroup_and_container(mount, space, shape):
    sub, runtime, cid, pod = shape
    path = TOP + sub
    p = _workload_in(mount, path, space)
    try:
        want_id = os.stat(mount + path).st_ino
        socks = sock_diag.dump(space)
        assert len(socks) == 7  # a listener, 3 connections, both ends each
        assert {s.cgroup_id for s in socks} == {want_id}   # the kernel's id for each socket
        resolver = containers.Resolver()
        home = resolver.by_id(want_id)
        assert (home.cgroup_id, home.path, home.runtime, home.container_id, home.pod_uid) == \
            (want_id, path, runtime, cid, pod)
        assert home.netns == space.inode
        assert tuple(home.columns()) == containers.COLUMNS and home.columns()["container_id"] == cid
        assert home.pod_name is None and home.pod_namespace is None  # no kubelet log directory here
        # the owner known in user space (who holds the sockets open) leads to the same home
        holders = proc_owners.holders({s.inode for s in socks if s.inode}, [])
        pids = {h.pid for hs in holders.values() for h in hs}
        assert pids == {p.pid}
        assert resolver.by_pid(p.pid) == home
        assert resolver.hits == 1 and resolver.misses == 1 and resolver.unresolved == 0
        # without file handles (no CAP_DAC_READ_SEARCH): a walk of the tree finds the same path
        walker = containers.Resolver()
        walker.handles = False
        assert walker.by_id(want_id) == home
    finally:
        p.stdin.close()
        p.wait(10)


def test_gone_cgroups_cache_cap_and_pod_names(mount, tmp_path):
    ids = []
    for i in range(3):
        os.makedirs(f"{mount}{TOP}/c{i}")
        ids.append(os.stat(f"{mount}{TOP}/c{i}").st_ino)
    os.rmdir(f"{mount}{TOP}/c2")
    r = containers.Resolver(cap=2)
    assert r.by_id(ids[2]) == containers.Home(ids[2])   # gone before we looked: only its id
    assert r.unresolved == 1
    assert r.by_id(ids[0]).path == f"{TOP}/c0" and r.by_id(ids[1]).path == f"{TOP}/c1"
    assert r.evicted == 1 and len(r.cache) == 2 and ids[2] not in r.cache  # the least recent left
    assert r.counters()["cgroups_cached"] == 2
    # the kubelet's log directory names the pod: NAMESPACE_NAME_UID
    (tmp_path / f"shop_web-7d9f_{UID}").mkdir()
    (tmp_path / "other_db-0_00000000-0000-0000-0000-000000000000").mkdir()
    h = containers.classify(f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope",
                            pods_dir=str(tmp_path))
    assert (h.pod_uid, h.pod_namespace, h.pod_name, h.runtime) == (UID, "shop", "web-7d9f", "cri-o")
    assert containers.pod_name(UID, pods_dir=str(tmp_path / "none")) == (None, None)


def test_cgroup2_mount_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("30 1 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                    "41 30 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n")
    assert containers.cgroup2_mount(str(info)) == "/sys/fs/cgroup/uni fied"
    info.write_text("30 1 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert containers.cgroup2_mount(str(info)) is None
    assert containers.Resolver(mount=None).by_id(5) == containers.Home(5)


def test_classify_other_layouts():
    assert containers.classify(f"/docker/{ID}").runtime == "docker"
    assert containers.classify(f"/libpod_parent/libpod-{ID}").container_id == ID
    assert containers.classify(f"/machine.slice/libpod-conmon-{ID}.scope").runtime == "podman conmon"
    h = containers.classify("/user.slice/user-0.slice/session-3.scope")
    assert (h.runtime, h.unit, h.container_id) == ("systemd scope", "session-3.scope", None)
    assert containers.classify("/").runtime is None
    # a 64-hex leaf is a container only where a layout says so
    assert containers.classify(f"/somewhere/{ID}").container_id is None


def test_recorded_snapshots_carry_health_and_container(mount, tmp_path, capsys):
    """End to end on the real kernel: a connection made by a process in a docker-shaped cgroup,
    inside a namespace, that retransmitted; a live trace with --record and --poll-interval; its
    recording's snapshots hold that socket's tcp_info health (as TCP_INFO tells it now) and its
    cgroup and container, and `analyze` lists the peer among the most retransmits."""
    import json
    import socket

    from netpair import B_ADDR, NetPair
    from test_health import Retransmitted

    from tcplife_trace import load
    from tcplife_trace.analysis_report import peer_health
    from tcplife_trace.cli import main
    from tcplife_trace.probes import health
    path = TOP + SHAPES[0][0]
    os.makedirs(mount + path)
    home = containers.pid_cgroup(os.getpid())
    with NetPair("hr") as pair:
        with open(mount + path + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))  # this process, while it makes the sockets (they keep that cgroup)
        try:
            conn = Retransmitted(pair)
        finally:
            with open(mount + home + "/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        rec_path = tmp_path / "h.arrow"
        r = subprocess.run([sys.executable, "-m", "tcplife_trace.cli", "--duration", "2", "--poll-interval", "1",
                            "--record", str(rec_path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        now = health.from_tcp_info(conn.client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))
        sn = load(str(rec_path)).snapshots()
        ours = sn[(sn.netns == pair.inode(pair.a)) & (sn.lport == conn.lport)]
        assert len(ours) >= 2  # the seed and the last look (both take ESTABLISHED)
        last = ours[ours.time == ours.time.max()].iloc[0]
        assert last.total_retrans == now["total_retrans"] > 0 and last.bytes_retrans == now["bytes_retrans"]
        assert last.rtt_ms == now["rtt_ms"] and last.snd_cwnd == now["snd_cwnd"]
        assert (last.cgroup, last.container_id, last.pod_uid) == (path, ID, None)
        assert last.cgroup_id == os.stat(mount + path).st_ino
        peers = peer_health(sn)
        mine = peers[peers.raddr == B_ADDR].iloc[0]
        assert mine.connections == 1 and mine.total_retrans == now["total_retrans"] and mine.retransmitting == 1
        capsys.readouterr()
        assert main(["analyze", str(rec_path)]) == 0
        text = capsys.readouterr().out
        assert "slowest peers by RTT" in text
        retrans = text[text.index("most retransmits per peer"):].split("\n\n")[0]
        assert B_ADDR in retrans
        assert main(["analyze", str(rec_path), "--format", "json"]) == 0
        rows = [x for x in json.loads(capsys.readouterr().out)["snapshots"]
                if x["lport"] == conn.lport and x["netns"] == pair.inode(pair.a)]
        assert rows and all(x["container_id"] == ID and x["total_retrans"] > 0 for x in rows)
        conn.close()
