"""Slow clients (slowloris) and connection floods against a real server (issue 14, item 7)."""

from __future__ import annotations

import socket
import time


from serve.helpers import Client, serving


def _trickle(srv, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
    return socks


def _closed(s: socket.socket) -> bool:
    """True once the server has answered (a 408) or closed the connection; False while it still waits."""
    try:
        s.settimeout(0.05)
        s.recv(4096)  # b"" (closed) or the 408's bytes: either way the server gave up on this client
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_trickling_connections_are_closed_after_the_read_timeout(guarded_dir, digits_data):
    with serving(guarded_dir, shadow_rate=0.0, read_timeout=1.0, max_connections=400) as srv:
        t0 = time.monotonic()
        socks = _trickle(srv, 300)
        for s in socks[:50]:  # keep trickling: bytes arriving do not extend the deadline
            s.sendall(b"X-A: b\r\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(_closed(s) for s in socks):
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        closed = sum(_closed(s) for s in socks)
        client = Client(srv)
        status, body = client.predict_json(digits_data[0][:2])
        client.close()
        for s in socks:
            s.close()
    assert closed == 300 and elapsed < 10, (closed, elapsed)
    assert status == 200 and body["shape"] == [2, 10]


def test_a_timed_out_request_line_gets_a_408(guarded_dir):
    with serving(guarded_dir, shadow_rate=0.0, read_timeout=0.5) as srv:
        s = socket.create_connection((srv.host, srv.port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\n")
        data = s.recv(4096)
        s.close()
    assert data.startswith(b"HTTP/1.1 408")


def test_slow_body_is_cut_and_the_server_stays_healthy(guarded_dir, digits_data):
    with serving(guarded_dir, shadow_rate=0.0, read_timeout=0.5) as srv:
        s = socket.create_connection((srv.host, srv.port), timeout=5)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 256\r\n\r\n" + b"\0" * 16)
        t0 = time.monotonic()
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        waited = time.monotonic() - t0
        s.close()
        client = Client(srv)
        ok, _ = client.predict_json(digits_data[0][:1])
        client.close()
    assert waited < 5 and ok == 200


def test_connection_limit_answers_503_not_a_hang(guarded_dir):
    with serving(guarded_dir, shadow_rate=0.0, read_timeout=30.0, max_connections=20) as srv:
        socks = _trickle(srv, 25)
        client = Client(srv)
        status, _, _ = client.request("GET", "/health")
        client.close()
        for s in socks:
            s.close()
        time.sleep(0.3)
        client = Client(srv)
        after = client.get_json("/health")["status"]
        client.close()
    assert status == 503 and after == "ok"
