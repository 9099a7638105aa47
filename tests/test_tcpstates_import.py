"""Text captured on this machine with bcc's and libbpf-tools' `tcpstates -T -w` imports into the
same frames (the workload: an HTTP fetch, a refused connect, an IPv6 connection aborted with
SO_LINGER 0)."""
import os

import pytest

from tcplife_trace import load

DATA = os.path.join(os.path.dirname(__file__), "data")
PATHS = {
    ("active", 8000): "CLOSE SYN_SENT ESTABLISHED CLOSE_WAIT LAST_ACK CLOSE",
    ("passive", 8000): "LISTEN SYN_RECV ESTABLISHED FIN_WAIT1 FIN_WAIT1 FIN_WAIT2 CLOSE",
    ("active", 9): "CLOSE SYN_SENT CLOSE",
    ("listener", 7070): "CLOSE LISTEN CLOSE",
    ("active", 7070): "CLOSE SYN_SENT ESTABLISHED CLOSE",
    ("passive", 7070): "LISTEN SYN_RECV ESTABLISHED CLOSE",
}


@pytest.mark.parametrize("name", ["tcpstates-bpfcc-T-w.txt", "libbpf-tcpstates-T-w.txt"])
def test_import_rebuilds_every_connection(name):
    rec = load(os.path.join(DATA, name))
    assert any("unknown: owner" in w for w in rec.warnings)
    lc = rec.lifecycles()
    got = {}
    for r in lc.itertuples():
        port = r.rport if r.role == "active" else r.lport
        got[(r.role, int(port))] = r.path
    assert got == PATHS
    assert lc.birth_seen.all() and (lc.end_reason != "open").all()
    sd = rec.state_durations()
    assert (sd.seconds > 0).all()


def test_perf_buffer_reordering_is_undone():
    # in the bcc capture CLOSE_WAIT -> LAST_ACK is printed before ESTABLISHED -> CLOSE_WAIT
    rec = load(os.path.join(DATA, "tcpstates-bpfcc-T-w.txt"))
    tr = rec.transitions
    client = tr[(tr.rport == 8000)]
    assert list(client.newstate.astype(str)) == ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK",
                                                 "CLOSE"]
    # durations come from the MS column: 0.044 ms in SYN_SENT, 1.500 in ESTABLISHED
    assert client.ms_in_old.round(3).tolist()[1:3] == [0.044, 1.5]
