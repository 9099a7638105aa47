"""Connection health from sock_diag's tcp_info (probes/health.py, read by probes/sock_diag.py), on the real kernel:
a connection between two namespaces made to retransmit (the peer blackholed while data is in
flight), compared with what `ss -ti` shows for the same socket at the same moment."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

import pytest
from pyroute2 import NetNS

from netpair import A_ADDR, B_ADDR, NetPair
from tcplife_trace.probes import btf, health
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


class Retransmitted:
    """A connection from namespace a to b that retransmitted (b blackholed while data was in
    flight), then delivered everything: idle, its counters still."""

    def __init__(self, pair: NetPair):
        self.pair = pair
        a, b = self.a, self.b = _ns(pair, pair.a), _ns(pair, pair.b)
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
        self.client, self.server, self.lsock = client, server, lsock
        self.lport = client.getsockname()[1]

    def close(self):
        for s in (self.client, self.server, self.lsock):
            s.close()


def test_retransmits_and_rtt_equal_ss():
    with NetPair("hh") as pair:
        conn = Retransmitted(pair)
        a, b, lport = conn.a, conn.b, conn.lport
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
        conn.close()


def test_fields_beyond_the_kernels_length_are_na():
    """An older kernel returns a shorter tcp_info: fields past its end are NA, never 0."""
    s = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(s.getsockname())
    a, _ = s.accept()
    c.sendall(b"z" * 1000)
    a.recv(2000)
    time.sleep(0.05)
    raw = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)  # the same struct as INET_DIAG_INFO
    full = health.from_tcp_info(raw)
    assert full["data_segs_out"] == 1 and full["rtt_ms"] is not None and full["bytes_retrans"] == 0
    # the struct as Linux 4.1 returned it (ends after bytes_received, 136 bytes): no segment counts,
    # no min RTT, no delivery rate, no retransmitted bytes
    old = health.from_tcp_info(raw[:136])
    for name in ("segs_in", "segs_out", "data_segs_in", "data_segs_out", "min_rtt_ms", "delivery_rate",
                 "delivered", "bytes_retrans"):
        assert old[name] is None, name
    for name in ("rtt_ms", "rttvar_ms", "total_retrans", "snd_cwnd", "lost", "reordering"):
        assert old[name] == full[name], name
    # a field cut in the middle is NA too
    assert health.from_tcp_info(raw[:210])["bytes_retrans"] is None
    assert health.from_tcp_info(b"")["rtt_ms"] is None
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


# -- BTF: what the kernel half will read at CLOSE ----------------------------------------------

READER = r"""
BPF_HASH(got, u32, u64, 64);
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6 || args->sport != WANT_SPORT || args->newstate != 4 /* FIN_WAIT1 */)
        return 0;
    const char *sk = (const char *)args->skaddr;
READS
    return 0;
}
"""


def test_btf_offsets_read_what_tcp_info_says():
    """The offsets from this kernel's BTF, read by a BPF program in the state change that
    shutdown() makes (before the FIN is sent), give the values TCP_INFO gave just before, on
    a connection that retransmitted: probes/health.from_tcp_sock, column for column."""
    from tcplife_trace import ebpf
    from tcplife_trace.probes.bcc_import import import_bcc
    fields, notes = btf.health_fields()
    assert notes == [] and all(m is not None for m in fields.values())
    names = list(fields)
    reads = "\n".join(f"    {{ u64 v = 0; u32 k = {i}; bpf_probe_read_kernel(&v, {fields[n].size}, sk + {fields[n].offset}); "
                      f"got.update(&k, &v); }}" for i, n in enumerate(names))
    with NetPair("hb") as pair:
        conn = Retransmitted(pair)
        os.environ["BCC_KERNEL_SOURCE"] = ebpf.STUB_KERNEL_SOURCE
        bcc = import_bcc()
        prog = bcc.BPF(text=READER.replace("READS", reads).encode(),
                       cflags=[f"-DWANT_SPORT={conn.lport}", "-Wno-unused-function"])
        try:
            info = health.from_tcp_info(conn.client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))
            conn.client.shutdown(socket.SHUT_WR)
            got = {names[k.value]: v.value for k, v in prog[b"got"].items()}
        finally:
            prog.cleanup()
        assert set(got) == set(names)
        assert got["total_retrans"] > 0 and got["icsk_retransmits"] == 0  # recovered: no RTO pending
        assert health.from_tcp_sock(got) == info
        conn.close()


def test_btf_lacking_a_field_gives_na_and_a_note():
    with open(btf.VMLINUX_BTF, "rb") as f:
        blob = bytearray(f.read())
    at = blob.index(b"\0bytes_retrans\0")
    blob[at + 1:at + 14] = b"bytes_retranz"   # this kernel's BTF, as one without that member
    fields, notes = btf.health_fields(btf=btf.BTF(bytes(blob)))
    assert fields["bytes_retrans"] is None
    assert len(notes) == 1 and "bytes_retrans" in notes[0] and "NA" in notes[0]
    assert all(m is not None for n, m in fields.items() if n != "bytes_retrans")
    values = health.from_tcp_sock({n: (None if m is None else 7) for n, m in fields.items()})
    assert values["bytes_retrans"] is None and values["total_retrans"] == 7
    assert btf.health_cflags(fields).get("OFF_TP_BYTES_RETRANS") is None
    assert btf.health_cflags(fields)["SZ_TP_TOTAL_RETRANS"] == 4
    # no BTF at all: every field absent, one line saying so
    fields, notes = btf.health_fields(path="/nonexistent/vmlinux")
    assert set(fields.values()) == {None} and len(notes) == 1 and "cannot read kernel BTF" in notes[0]


def test_btf_member_sizes_and_paths():
    b = btf.BTF(open(btf.VMLINUX_BTF, "rb").read())
    assert btf.member(b, "tcp_sock", "bytes_retrans").size == 8
    assert btf.member(b, "tcp_sock", "srtt_us").size == 4
    # rtt_min.s[1] is the next minmax sample: 8 bytes (t, v) after s[0]
    assert btf.member(b, "tcp_sock", "rtt_min.s[1].v").offset - btf.member(b, "tcp_sock", "rtt_min.s[0].v").offset == 8
    # the byte counts the tracer reads already agree with the old reader
    assert btf.member(b, "tcp_sock", "bytes_acked").offset == b.offset("tcp_sock", "bytes_acked")
    with pytest.raises(btf.BTFError):
        btf.member(b, "tcp_sock", "rtt_min.s[3].v")   # minmax has 3 samples
    with pytest.raises(btf.BTFError):
        btf.member(b, "tcp_sock", "no_such_member")


def test_rst_reason_names_are_the_kernels():
    """enum sk_rst_reason from BTF: the names tcp_send_reset's own format prints, number for number."""
    from tcplife_trace.probes import tracefs
    names, notes = btf.rst_reason_names()
    with open(f"{tracefs.find_tracefs()}/events/tcp/tcp_send_reset/format") as f:
        fmt = f.read()
    printed = fmt[fmt.index("__print_symbolic(REC->reason"):]
    want = {int(v): n for v, n in re.findall(r'\{ (\d+), "(\w+)" \}', printed)}
    assert notes == [] and names == want and names[0] == "NOT_SPECIFIED"
    # a BTF without the enum (kernels before 6.10): nothing, and a note
    with open(btf.VMLINUX_BTF, "rb") as f:
        blob = bytearray(f.read())
    at = blob.index(b"\0sk_rst_reason\0")
    blob[at + 1] = ord("x")
    none, notes = btf.rst_reason_names(btf=btf.BTF(bytes(blob)))
    assert none == {} and len(notes) == 1 and "by number" in notes[0]
