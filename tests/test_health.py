"""Connection health from sock_diag's tcp_info (probes/sock_diag.health), on the real kernel:
a connection between two namespaces made to retransmit (the peer blackholed while data is in
flight), compared with what `ss -ti` shows for the same socket at the same moment."""
from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import pytest
from pyroute2 import NetNS

from netpair import A_ADDR, B_ADDR, NetPair
from tcplife_trace.probes import netns as netns_mod
from tcplife_trace.probes import sock_diag

pytestmark = pytest.mark.privileged


def _ns(pair: NetPair, name: str) -> netns_mod.Netns:
    return netns_mod.Netns(pair.inode(name), f"/run/netns/{name}", name)


def _ss(ns: str, lport: int) -> dict[str, str]:
    """`ss -tinH` of the one socket with local port lport in ns: its key:value tokens
    (rtt:a/b, retrans:x/y, ...) and the delivery_rate's value."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", "sport", f"= :{lport}"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert out.count("\n") == 2, out  # one socket: its line and its info line
    info = out.splitlines()[1]
    fields = dict(t.split(":", 1) for t in info.split() if re.fullmatch(r"[a-z_]+:[^(]\S*", t))
    m = re.search(r"delivery_rate (\d+)bps", info)
    if m:
        fields["delivery_rate"] = m.group(1)
    return fields


def _ours(ns: netns_mod.Netns, lport: int) -> sock_diag.Sock:
    found = [s for s in sock_diag.dump(ns) if s.lport == lport and s.state == sock_diag.S.ESTABLISHED]
    assert len(found) == 1, found
    return found[0]


def _unblackhole(pair: NetPair, ns: str, addr: str) -> None:
    """Drop the bogus neighbour entry of pair.blackhole: ARP finds the peer again."""
    with NetNS(ns) as ip:
        ip.neigh("del", dst=addr, ifindex=ip.link_lookup(ifname=f"{ns}0")[0])


def test_retransmits_and_rtt_equal_ss():
    with NetPair("hh") as pair:
        a, b = _ns(pair, pair.a), _ns(pair, pair.b)
        with netns_mod.entered(b):
            lsock = socket.create_server((B_ADDR, 0))
        with netns_mod.entered(a):
            client = socket.create_connection((B_ADDR, lsock.getsockname()[1]), timeout=10)
        server, _ = lsock.accept()
        got = bytearray()
        want = 4_000_000

        def read():
            server.settimeout(20)
            while len(got) < want:
                chunk = server.recv(1 << 16)
                if not chunk:
                    break
                got.extend(chunk)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        client.sendall(b"p" * 100_000)      # RTT samples before the outage
        time.sleep(0.2)
        # the peer unreachable for a moment: frames to a bogus MAC leave and are dropped by the
        # peer's veth (taking the veth down instead holds them in the neighbour queue: the kernel
        # then declines to retransmit a segment still queued in the host, and nothing is counted)
        pair.blackhole(pair.a, B_ADDR)
        # what fits the send buffer now (never blocks: the peer cannot ack until it is back)
        queued = client.send(b"x" * 60_000, socket.MSG_DONTWAIT)
        time.sleep(1.0)                     # the RTO fires at least once (200 ms minimum, backed off)
        _unblackhole(pair, pair.a, B_ADDR)
        client.settimeout(30)               # (the next backed-off retransmit carries on: up to 1.6 s)
        client.sendall(b"y" * (want - 100_000 - queued))
        reader.join(20)
        assert len(got) == want
        time.sleep(0.3)                     # the last ACKs in: the socket is idle, its counters still
        lport = client.getsockname()[1]
        before = _ours(a, lport)
        ss = _ss(pair.a, lport)
        after = _ours(a, lport)
        assert before.health == after.health, (before.health, after.health)  # nothing moved meanwhile
        h = after.health
        assert h["total_retrans"] > 0, h    # the outage made the kernel retransmit
        assert h["bytes_retrans"] > 0 and h["data_segs_out"] > h["total_retrans"]
        # ss prints tcpi_rtt / 1000 and tcpi_rttvar / 1000 with %g: the same microseconds
        rtt, var = (float(x) for x in ss["rtt"].split("/"))
        assert h["rtt_ms"] == pytest.approx(rtt, abs=5e-4) and h["rttvar_ms"] == pytest.approx(var, abs=5e-4)
        assert h["min_rtt_ms"] == pytest.approx(float(ss["minrtt"]), abs=5e-4)
        assert h["total_retrans"] == int(ss["retrans"].split("/")[1])
        assert h["bytes_retrans"] == int(ss["bytes_retrans"])
        for ours, theirs in (("segs_out", "segs_out"), ("segs_in", "segs_in"), ("data_segs_out", "data_segs_out"),
                             ("delivered", "delivered"), ("snd_cwnd", "cwnd")):
            assert h[ours] == int(ss[theirs]), (ours, h, ss)
        assert h["lost"] == int(ss.get("lost", 0))                 # (ss leaves out 0)
        assert h["reordering"] == int(ss.get("reordering", 3))     # (ss leaves out the default 3)
        assert h["delivery_rate"] * 8 == int(ss["delivery_rate"])  # ss: bits per second
        # the receiving side had no data to time before the outage's data: its estimate or NA
        assert ("rcv_rtt" in ss) == (h["rcv_rtt_ms"] is not None)
        # the peer's side: it received data segments, sent none
        accepted = [s for s in sock_diag.dump(b) if s.state == sock_diag.S.ESTABLISHED]
        assert len(accepted) == 1 and accepted[0].health["data_segs_in"] >= h["data_segs_out"] - h["total_retrans"]
        assert accepted[0].health["data_segs_out"] == 0
        for s in (client, server, lsock):
            s.close()


def test_fields_beyond_the_kernels_length_are_na():
    """An older kernel returns a shorter tcp_info: fields past its end are NA, never 0."""
    s = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(s.getsockname())
    a, _ = s.accept()
    c.sendall(b"z" * 1000)
    a.recv(2000)
    time.sleep(0.05)
    raw = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)  # the same struct as INET_DIAG_INFO
    full = sock_diag.health(raw)
    assert full["data_segs_out"] == 1 and full["rtt_ms"] is not None and full["bytes_retrans"] == 0
    # the struct as Linux 4.1 returned it (ends after bytes_received, 136 bytes): no segment counts,
    # no min RTT, no delivery rate, no retransmitted bytes
    old = sock_diag.health(raw[:136])
    for name in ("segs_in", "segs_out", "data_segs_in", "data_segs_out", "min_rtt_ms", "delivery_rate",
                 "delivered", "bytes_retrans"):
        assert old[name] is None, name
    for name in ("rtt_ms", "rttvar_ms", "total_retrans", "snd_cwnd", "lost", "reordering"):
        assert old[name] == full[name], name
    # a field cut in the middle is NA too
    assert sock_diag.health(raw[:210])["bytes_retrans"] is None
    assert sock_diag.health(b"")["rtt_ms"] is None
    for x in (a, c, s):
        x.close()


def test_no_sample_is_na_not_zero():
    """A socket that never had an RTT sample (SYN_SENT to nobody) has NA rtt and min_rtt."""
    with NetPair("hn") as pair:
        a = _ns(pair, pair.a)
        pair.blackhole(pair.a, B_ADDR)
        with netns_mod.entered(a):
            c = socket.socket()
            c.setblocking(False)
            assert c.connect_ex((B_ADDR, 9)) in (115,)  # EINPROGRESS
        time.sleep(0.1)
        found = [s for s in sock_diag.dump(a) if s.state == sock_diag.S.SYN_SENT]
        assert len(found) == 1
        h = found[0].health
        assert h["rtt_ms"] is None and h["rttvar_ms"] is None and h["min_rtt_ms"] is None
        assert h["rcv_rtt_ms"] is None and h["data_segs_out"] == 0
        assert A_ADDR == found[0].laddr
        c.close()
