"""uvicorn's h11 protocol with a read deadline: a client must send a whole request within ``read_timeout`` s.

uvicorn times out only idle keep-alive connections: a client that trickles its headers (or body) one byte at a
time keeps a connection, and a task, open for as long as it likes (slowloris). Here every request, from its
first byte (or from the connection's start) to its last body byte, must arrive within ``read_timeout``
seconds; otherwise the connection is closed (with a ``408`` when no request line had been read yet). The
number of connections is bounded by uvicorn's ``limit_concurrency`` (``--max-connections``): beyond it requests
are answered 503 until slow connections time out.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: 46\r\n\r\n{\"error\": \"request not received within time\"}\n")


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol whose requests must arrive whole within ``config.lowbit_read_timeout`` seconds."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.read_timeout = float(getattr(config, "lowbit_read_timeout", 10.0))
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the whole request is in: answering it may take as long as it takes

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("closed a connection from %s: request not received within %g s", self.client, self.read_timeout)
        if (self.cycle is None or self.cycle.response_complete) and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMEOUT_408)
        self.transport.close()
