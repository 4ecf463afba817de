"""HTTP plumbing shared by both surfaces: JSON responses, body reading with limits, error handlers,
and the access log that masks user identifiers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from abstream.config import Settings
from gateway.body import decode_body, refuse_duplicate_keys
from gateway.http_protocol import BODY_MIN_RATE, BODY_TIMEOUT_S
from schemas.errors import ApiError

log = logging.getLogger("abstream.gateway")
access_log = logging.getLogger("abstream.access")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def mask_id(value: object) -> str:
    """Log-safe form of a user identifier: the length, and a 4-character prefix only when that is at most a third of
    the id (enough to tell UUIDs apart in a log, too little to read a short id from it)."""
    if not isinstance(value, str) or not value:
        return "-"
    return f"{log_safe(value[:4])}…({len(value)})" if len(value) >= 12 else f"…({len(value)})"


def log_safe(text: str, limit: int = 256) -> str:
    """``text`` as one log line can hold it: control characters escaped (a path with an encoded newline must not
    forge a log line), cut to ``limit`` characters."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "…"


async def read_json(request: Request, settings: Settings, *, per_event: bool = False) -> Any:
    """The request body as JSON, refusing oversize bodies before reading them all (413).

    ``per_event``: an ingestion body, whose numbers no 64-bit reader keeps (an integer beyond 64 bits, 1e999)
    are left for each event's validation to reject (see :func:`gateway.body.decode_body`) instead of refusing
    the whole request, and duplicate keys for the ingestion core to refuse (it counts the keys anyway). A refusal
    carries the body for its dead letter (``ApiError.sent``).
    """
    try:
        body = await _read_body(request, settings)
    except ClientDisconnect:  # nobody is left to answer: a 400 in the access log, not a 500 and a traceback
        raise ApiError(400, "incomplete_body", "the client closed the connection before the whole body") from None
    value = decode_body(
        request.headers.get("content-type"),
        request.headers.get("content-encoding"),
        body,
        settings,
        big_integers="mark" if per_event else "refuse",
    )
    if not per_event:  # the ingestion core checks while it walks the events (gateway.ingest)
        refuse_duplicate_keys(value)
    return value


async def _read_body(request: Request, settings: Settings) -> bytes:
    """The body, refused as soon as it is too large (413) or too slow (408 ``body_timeout``: BODY_TIMEOUT_S plus a
    second per BODY_MIN_RATE bytes received, so a client trickling bytes cannot hold the request open)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "invalid_content_length", "Content-Length is not a number") from None
        if declared > settings.max_body_bytes:
            raise ApiError(413, "payload_too_large", f"body is larger than {settings.max_body_bytes} bytes")
    receive = request.receive
    deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the body did not arrive in time ({size} bytes in; {BODY_TIMEOUT_S:.0f} s plus 1 s per "
                f"{BODY_MIN_RATE} bytes allowed)",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, "payload_too_large", f"body is larger than {settings.max_body_bytes} bytes")
            chunks.append(chunk)
            deadline += len(chunk) / BODY_MIN_RATE
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # Starlette's cache: request.body() answers the same bytes
    return body


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    err = ApiError(exc.status_code, code, message, headers=dict(exc.headers or {}))
    return error_response(err)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, log_safe(request.url.path))
    return error_response(ApiError(500, "internal_error", "internal error; it has been logged"))


class AccessLogMiddleware:
    """One line per request: method, path, status, duration and the masked user id a route noted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            user = scope.get("state", {}).get("log_user")
            access_log.info(
                "%s %s %d %.1fms user=%s",
                scope["method"],
                log_safe(scope["path"]),
                status,
                (time.perf_counter() - start) * 1000,
                mask_id(user),
            )


def note_user(request: Request, user_id: object) -> None:
    """Let the access log show this request's user, masked."""
    request.state.log_user = user_id
