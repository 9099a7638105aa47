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


GOOD = os.path.join(DATA, "tcpstates-bpfcc-T-w.txt")


def _one_bad_line(tmp_path, change):
    """The bcc capture with its first data line changed by change(tokens)."""
    with open(GOOD) as f:
        lines = f.read().splitlines()
    i = next(k for k, ln in enumerate(lines) if "->" in ln.split() and "OLDSTATE" not in ln)
    tok = lines[i].split()
    change(tok)
    lines[i] = " ".join(tok)
    p = tmp_path / "bad.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _set(where, value):
    def change(tok):
        arrow = tok.index("->")
        tok[{"skaddr": 1, "laddr": arrow - 5, "lport": arrow - 4, "raddr": arrow - 3, "rport": arrow - 2,
             "ms": arrow + 2}[where]] = value
    return change


@pytest.mark.parametrize("where,value", [
    ("skaddr", "ffffzz8e1b3a8000"), ("skaddr", "1" * 17), ("laddr", "127.0.0.300"), ("raddr", "not-an-address"),
    ("laddr", "::1::2"), ("lport", "70000"), ("rport", "-1"), ("ms", "nan"), ("ms", "inf"), ("ms", "-3"),
])
def test_a_line_with_a_bad_field_is_skipped_and_counted(tmp_path, where, value):
    rec = load(_one_bad_line(tmp_path, _set(where, value)))
    assert any("1 line(s) not understood" in w for w in rec.warnings), rec.warnings
    total = sum("->" in ln.split() and "OLDSTATE" not in ln for ln in open(GOOD))
    assert rec.transitions.shape[0] == total - 1  # every other line imported
    rec.lifecycles()
