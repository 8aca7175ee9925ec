"""Running the application on uvicorn: in the foreground (``lowbit serve``) or in a background thread.

``run_server`` blocks until SIGINT / SIGTERM, then lets in-flight requests and a running re-calibration finish
before it returns (shadow comparisons still queued are dropped). ``ServerThread`` serves on a socket bound before the thread starts
(port 0 picks a free port), for embedding and tests; leaving its ``with`` block shuts it down the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from lowbit.serve.app import ServeApp
from lowbit.serve.protocol import DeadlineH11Protocol

log = logging.getLogger(__name__)


def _config(app: ServeApp, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn settings: h11 with a read deadline (``--read-timeout``), ``--max-connections``, 5 s keep-alive."""
    config = uvicorn.Config(app.app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10, http=DeadlineH11Protocol,
                            limit_concurrency=app.config.max_connections, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=16 * 1024)
    config.lowbit_read_timeout = app.config.read_timeout
    return config


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: a free one); RuntimeError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so; without it, Nagle's
    # algorithm and the client's delayed ACK add ~40 ms to every response written in two parts
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_server(app: ServeApp, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on the bound ``sock`` until SIGINT / SIGTERM."""
    host, port = sock.getsockname()[:2]
    try:
        uvicorn.Server(_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """``with ServerThread(app) as srv: ... srv.url ...``: a real uvicorn server on loopback in a thread."""

    def __init__(self, app: ServeApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, host, self.port, log_level))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                         name="lowbit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"lowbit serve: the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"lowbit serve: the server on {self.url} did not stop within {timeout} s")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
