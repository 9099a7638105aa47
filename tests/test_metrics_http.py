"""The metrics endpoint's HTTP side: clients that misbehave cost one line, not a traceback."""
import socket
import time

from tcplife_trace.metrics import ClientErrors, Metrics, serve

BAD_REQUESTS = [
    b"GET " + b"a" * 70000 + b" HTTP/1.0\r\n\r\n",                       # 414, client already gone
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200 + b"\r\n",  # too many headers
    b"\x16\x03\x01garbage\r\n\r\n",                                       # TLS to a plain-HTTP port
    b"BREW /pot HTTP/1.0\r\n\r\n",
]


def _abuse(port):
    for req in BAD_REQUESTS:
        for reset in (False, True):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                c.sendall(req)
            except OSError:
                pass
            if reset:  # SO_LINGER 0: a RST while the server still writes its answer
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()
            time.sleep(0.02)


def _scrape(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


def test_misbehaving_clients_log_one_rate_limited_line_and_scrapes_go_on(capfd):
    errors = ClientErrors(every_s=60)
    server = serve(Metrics(), 0, "127.0.0.1", errors)
    port = server.server_address[1]
    try:
        _abuse(port)
        _abuse(port)
        deadline = time.monotonic() + 5
        while errors.total < 4 and time.monotonic() < deadline:  # the handler threads finish
            time.sleep(0.05)
        assert b"tcplife_transitions" in _scrape(port)  # the endpoint still answers
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    assert errors.total >= 4  # the abuse did make the server fail requests
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line for all of them (rate-limited)
    assert lines[0].startswith("tcplife-trace: notice: metrics client 127.0.0.1:"), lines


def test_client_error_lines_fold_what_the_limit_held_back(capfd):
    errors = ClientErrors(every_s=0.2)
    for _ in range(5):
        errors(("127.0.0.1", 1), BrokenPipeError(32, "Broken pipe"))
    time.sleep(0.25)
    errors(("127.0.0.1", 2), BrokenPipeError(32, "Broken pipe"))
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and "BrokenPipeError" in lines[0]
    assert "4 more client errors since the last such line" in lines[1]
