"""Reset reasons named as this kernel numbers them (enum sk_rst_reason from BTF), live and offline.

A real abort on data on loopback: the server closes an accepted connection whose data it
never read, so the kernel zaps it with a reset (tcp_close: "unread data was tossed",
TCP_ABORT_ON_CLOSE). Its reason number must be shown by the BTF's name, in the stream, in
the kernel's folds and in a recording's frames; a recording made on a kernel that numbers
the enum otherwise is named by the table its header holds.
"""
import socket
import time

import pytest

from tcplife_trace.analysis import end_rules
from tcplife_trace.live import LiveSession
from tcplife_trace.probes import btf
from tcplife_trace.probes import program as prog
from tcplife_trace.recording import Recording

pytestmark = pytest.mark.privileged

NAMES, _NOTES = btf.rst_reason_names()


def abort_on_data(session: LiveSession, closed: list) -> tuple[int, int]:
    """(server port, client port) of one connection the server closed with unread data."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    cli.sendall(b"x" * 1000)
    time.sleep(0.05)              # the data is in conn's receive queue, unread
    conn.close()                  # -> RST (TCP_ABORT_ON_CLOSE)
    with pytest.raises(ConnectionResetError):
        for _ in range(50):
            cli.recv(10)
            time.sleep(0.02)
    cport = cli.getsockname()[1]
    cli.close()
    srv.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(lc.lport in (port, cport) for lc in closed) < 2:
        session.poll(50)
        session.tracker.advance(time.monotonic_ns() + session.tracker.hold_ns)
    return port, cport


@pytest.mark.skipif(not NAMES, reason="this kernel's BTF has no enum sk_rst_reason")
@pytest.mark.parametrize("mode", ["stream", "aggregate"])
def test_abort_on_data_reset_is_named_by_btf(mode):
    closed = []
    session = LiveSession(prog.Settings(mode=mode), on_close=closed.append, keep_events=mode == "stream")
    try:
        port, cport = abort_on_data(session, closed)
    finally:
        report = session.stop()
    server = [lc for lc in closed if lc.lport == port and lc.role == "passive"]
    client = [lc for lc in closed if lc.lport == cport and lc.rport == port]
    assert len(server) == 1 and len(client) == 1, (report, closed)
    lc = server[0]
    assert lc.rst_sent is not None, vars(lc)
    number = lc.rst_sent[0]
    name = NAMES[number]
    assert name == "TCP_ABORT_ON_CLOSE"   # what tcp_close sends for unread data
    assert end_rules.kernel_reset_reasons().source == "btf"
    assert (lc.end_reason, lc.end_detail) == ("local_abort", f"RST sent ({name}) in ESTABLISHED")
    assert client[0].end_reason == "reset_by_peer"
    if mode != "stream":
        return
    # offline: the recording holds this kernel's table and its frames name the reason by it
    rec = session.recording()
    assert rec.header["rst_reasons"][str(number)] == name
    row = rec.lifecycles().set_index("conn_id").loc[lc.conn_id]
    assert (row.end_reason, row.end_detail, row.rst_sent_reason) == \
        ("local_abort", f"RST sent ({name}) in ESTABLISHED", name)
    # a recording made on a kernel that numbers the enum otherwise: named by its own table
    other = dict(rec.header, rst_reasons={**rec.header["rst_reasons"], str(number): "ANOTHER_KERNELS_NAME"})
    again = Recording.from_events(session.kept, other)
    row = again.lifecycles().set_index("conn_id").loc[lc.conn_id]
    assert (row.end_detail, row.rst_sent_reason) == ("RST sent (ANOTHER_KERNELS_NAME) in ESTABLISHED",
                                                     "ANOTHER_KERNELS_NAME")


def test_without_the_enum_the_fallback_table_names_reasons():
    """A kernel whose BTF has no enum sk_rst_reason: the fallback table, in the kernel's spelling."""
    rs = end_rules.ResetReasons(end_rules.FALLBACK_RST_REASONS, "fallback")
    assert rs.name(11) == "TCP_ABORT_ON_CLOSE" and rs.name(99) == "99" and rs.keepalive == 15
    f = end_rules.Ends(False, False, 1, False, 104, True, 11)
    assert end_rules.classify(f, rs) == ("local_abort", "RST sent (TCP_ABORT_ON_CLOSE) in ESTABLISHED", None)
    # a recording made before headers kept the table: this kernel's
    assert end_rules.ResetReasons.from_header({}) is end_rules.kernel_reset_reasons()


def test_files_from_kernels_numbering_the_enum_otherwise_are_each_named_by_their_own():
    import numpy as np

    from tcplife_trace.frames.lifecycles import _one_numbering
    a = end_rules.ResetReasons({11: "TCP_ABORT_ON_CLOSE", 16: "TCP_DISCONNECT_WITH_DATA"}, "recording")
    b = end_rules.ResetReasons({11: "TCP_ABORT_ON_CLOSE", 16: "SOMETHING_ELSE"}, "recording")
    ids = np.array([1, 2, (1 << 48) + 1, (1 << 48) + 2], dtype=np.uint64)
    table, numbers = _one_numbering([a, b], ids, np.array([16, 11, 16, 11]))
    assert [table.name(v) for v in numbers] == ["TCP_DISCONNECT_WITH_DATA", "TCP_ABORT_ON_CLOSE",
                                                "SOMETHING_ELSE", "TCP_ABORT_ON_CLOSE"]
