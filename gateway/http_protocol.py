"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol with the limits it does not have.

uvicorn (0.55, httptools) bounds neither the size nor the time of a request head, and once a response is sent it
reads whatever rest of a request body comes, at any pace: measured, a 10 MB header was read whole and answered
200, and a client trickling bytes kept its connection forever (each byte also cancels uvicorn's keep-alive timer).
This protocol adds, per connection:

* the head (request line and headers) at most :data:`MAX_HEAD_BYTES`: else 431 ``headers_too_large``;
* the head complete within :data:`HEAD_TIMEOUT_S` of the connection or of the previous answer: else 408
  ``header_timeout`` (a connection that sent nothing is closed without a word);
* a body the app answered without reading it all (413 on its declared length, 404 before the read) must finish
  arriving like any body (:data:`BODY_TIMEOUT_S` plus a second per :data:`BODY_MIN_RATE` bytes), or the
  connection is closed: the answer is already out;
* httptools' own refusals (a malformed request line, a NUL in a header) in the JSON error shape, not plain text.

The body of a request the app reads is timed by the app itself (``gateway.plumbing``), with the same figures, so
that its 408 ``body_timeout`` is an ordinary answer. A refusal here is written, the sending side shut, and what the
client still sends read and dropped for up to :data:`LINGER_S` before the close: closing with unread bytes would
reset the connection, and the client would see a reset rather than the 431.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 65_536
"""Request line and headers together (nginx's default allows 4 x 8 KiB lines; Node.js 16 KiB in all)."""
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
"""A body's first allowance; every :data:`BODY_MIN_RATE` bytes received add a second (Apache's mod_reqtimeout
scheme): a 1 MiB body may take ~17 minutes on a slow line, a client trickling bytes gets ~10 s."""
BODY_MIN_RATE = 1_000
LINGER_S = 2.0


def error_bytes(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer in the gateway's error shape, closing the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message, "details": []}})
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        )
    )


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded head (size and time) and bounded unread bodies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._drain_deadline: float | None = None
        self._refused = False

    # ---- timers --------------------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # idle: nothing to answer
            self.transport.close()
            return
        self._refuse(408, "header_timeout", f"the request head did not arrive within {HEAD_TIMEOUT_S:.0f} s")

    def _drain_check(self) -> None:
        self._timer = None
        if self._drain_deadline is None or self.transport.is_closing():
            return
        left = self._drain_deadline - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._drain_check)
        else:  # the answer is out; the rest of this body is not worth a connection
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` now (unless an answer is under way), then close after a short linger."""
        self._refused = True
        self._disarm()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(error_bytes(status, code, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    # ---- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEAD_TIMEOUT_S, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop, so that closing does not reset the connection
        if self._reading_head:
            self._head_bytes += len(data)  # the body's first bytes too; counted only while the head is unfinished
        elif self._drain_deadline is not None:
            self._drain_deadline += len(data) / BODY_MIN_RATE
        super().data_received(data)
        if self._reading_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(431, "headers_too_large", f"request line and headers exceed {MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request: the error shape every answer has."""
        self._refused = True
        self._disarm()
        self.transport.write(error_bytes(400, "invalid_http", f"{msg.rstrip('.')}: not a valid HTTP/1.1 request"))
        self.transport.close()

    # ---- parser callbacks ----------------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0
        if self._drain_deadline is not None:  # the body of an answered request ended: wait for the next head
            self._drain_deadline = None
            self._arm(HEAD_TIMEOUT_S, self._head_timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._refused:
            return
        if self.cycle is not None and self.cycle.more_body and not self._reading_head:
            # answered before the whole body arrived: it is read and dropped, within a body's time
            self._drain_deadline = self.loop.time() + BODY_TIMEOUT_S
            self._arm(BODY_TIMEOUT_S, self._drain_check)
        else:
            self._arm(HEAD_TIMEOUT_S, self._head_timeout)  # idle: uvicorn's keep-alive timeout closes first
