"""Embedded ClickHouse HTTP endpoint over chDB: a development and test component.

chDB runs the ClickHouse engine in-process, and only ONE process may open a data directory. This
process owns it and serves the ClickHouse HTTP protocol, so the gateway, the Faust workers, the
analysts and the tests all talk to it with plain clickhouse-connect over HTTP, exactly as they talk
to a real ClickHouse server in production (where CLICKHOUSE_URL points at that server instead).

What it serves (the subset clickhouse-connect, curl and Grafana-style SQL need):

- ``/ping`` and ``GET /`` answer ``Ok.``; queries go to ``/`` by GET (read-only, as ClickHouse) or
  POST, the SQL in ``query=`` and/or the body (ClickHouse semantics: URL query, a newline, the body);
- ``database=`` / ``X-ClickHouse-Database``, ``default_format=``, ``param_NAME=`` server-side
  parameters, settings as URL arguments, sessions (``session_id=``: SET/USE/temporary tables persist);
- ``INSERT ... FORMAT X`` with the data after the statement, request bodies in gzip, deflate, lz4
  (several back-to-back frames), zstd (several frames), xz, bz2 (and br when ``brotli`` is installed),
  chunked or not, and multipart/form-data query fields;
- results in the format the SQL names (TabSeparated when none), compressed when the client asks
  (``enable_http_compression=1`` + ``Accept-Encoding``), with ClickHouse's response headers;
- errors as ClickHouse sends them: a non-200 status, ``Code: N. DB::Exception: ...`` and the
  ``X-ClickHouse-Exception-Code`` header, never a Python traceback.

Who may query it depends on where it listens (``abstream.devstack.clickhouse_auth``):

- on loopback (``--host`` in 127.0.0.0/8, ``::1`` or ``localhost``, the default 127.0.0.1) any user and
  password are accepted: development and the tests connect as ``default`` with no password;
- bound to any other address, every request but the pings must present the user and password of
  CLICKHOUSE_URL (X-ClickHouse-User/X-ClickHouse-Key headers, HTTP Basic auth as clickhouse-connect sends,
  or ``user``/``password`` URL arguments), compared in constant time; anything else is answered as
  ClickHouse answers a wrong password (``Code: 516 ... (AUTHENTICATION_FAILED)``, HTTP 403). With no
  password in CLICKHOUSE_URL it refuses to start (one line on stderr, exit status 2).

This is still not a production server: production authentication, users and grants are the real
ClickHouse server's job.

The parts, one job each: ``clickhouse_errors`` (ClickHouse-shaped errors), ``clickhouse_sql`` (where an
INSERT's data starts, which format a query names), ``clickhouse_codecs`` (compressed and multipart bodies),
``clickhouse_engine`` (chDB connections and their state), ``clickhouse_executor`` (one request in a worker
thread), ``clickhouse_auth`` (credentials); this module is the ASGI app (routing, sessions) and ``serve``.

Each worker thread owns one chDB connection (connections to one path run in parallel in chDB; a
connection is used by one thread at a time), each session owns one more; pings never touch chDB,
so a slow query cannot starve them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

from abstream.config import Settings, SettingsError
from abstream.devstack.clickhouse_auth import Authenticator, is_loopback
from abstream.devstack.clickhouse_engine import Engine, Slot
from abstream.devstack.clickhouse_errors import (
    SESSION_IS_LOCKED,
    SESSION_NOT_FOUND,
    STD_EXCEPTION,
    UNSUPPORTED_METHOD,
    ClickHouseError,
)
from abstream.devstack.clickhouse_executor import Executor, Request, Response

log = logging.getLogger("abstream.clickhouse_local")

DEFAULT_WORKERS = 16
SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600
KEEP_ALIVE_S = 60

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# HTTP (ASGI) layer: pings on the event loop, queries in worker threads, sessions
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    slot: Slot | None = None
    busy: bool = False
    timeout_s: float = SESSION_TIMEOUT_S
    last_used: float = field(default_factory=time.monotonic)


class App:
    """The ASGI application: routing, credentials, body reading and sessions; chDB work goes to the pool.

    ``auth`` None admits every request (loopback); else each query must present its user and password.
    """

    def __init__(self, engine: Engine, workers: int = DEFAULT_WORKERS, auth: Authenticator | None = None) -> None:
        self.engine = engine
        self.auth = auth
        self.executor = Executor(engine)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chdb")
        self.sessions: dict[str, Session] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except Exception:  # the response may not have started: answer like ClickHouse would
            log.exception("internal error in the HTTP layer")
            error = ClickHouseError.new(STD_EXCEPTION, "STD_EXCEPTION", "internal error in the embedded endpoint")
            with contextlib.suppress(Exception):
                await self._send(send, self.executor.error(error, ""), head_only=False)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._reaper = asyncio.create_task(self._reap_sessions())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reaper is not None:
                    self._reaper.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _reap_sessions(self) -> None:
        """Close sessions idle past their timeout (ClickHouse's session_timeout, default 60 s)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session_id, session in list(self.sessions.items()):
                if not session.busy and now - session.last_used > session.timeout_s:
                    del self.sessions[session_id]
                    if session.slot is not None:
                        await loop.run_in_executor(self.pool, self.engine.drop_slot, session.slot)

    @staticmethod
    async def _send(send: Send, response: Response, head_only: bool) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        headers.append((b"keep-alive", f"timeout={KEEP_ALIVE_S}".encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head_only else response.body})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"].upper()
        path = scope["path"]
        head_only = method == "HEAD"
        raw_query = scope.get("query_string", b"").decode("utf-8", "replace")
        if path in ("/ping", "/replicas_status") or (path == "/" and method in ("GET", "HEAD") and not raw_query):
            await self._send(send, Response(200, b"Ok.\n", [("content-type", "text/html; charset=UTF-8")]), head_only)
            return
        params = dict(parse_qsl(raw_query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        if method not in ("GET", "HEAD", "POST"):
            error = ClickHouseError.new(
                UNSUPPORTED_METHOD, "UNSUPPORTED_METHOD", f"HTTP method {method} is not supported"
            )
            await self._send(send, replace(self.executor.error(error, query_id), status=405), head_only)
            return
        if path != "/" and method != "POST" and not params:  # as ClickHouse: any path takes queries
            error = ClickHouseError.new(
                UNSUPPORTED_METHOD,
                "UNSUPPORTED_METHOD",
                f"There is no handle {path}. Use / or /ping for health checks, send queries to / (GET or POST)",
            )
            await self._send(send, replace(self.executor.error(error, query_id), status=404), head_only)
            return

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.auth is not None:
            try:
                self.auth.check(headers, params)
            except ClickHouseError as exc:  # before the body is read: a stranger's upload is not buffered
                await self._send(send, self.executor.error(exc, query_id), head_only)
                return
        body: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                body.append(chunk)
            if not message.get("more_body", False):
                break
        request = Request(method, params, headers, body)

        loop = asyncio.get_running_loop()
        session_id = params.get("session_id", "")
        if not session_id:
            response = await loop.run_in_executor(self.pool, self.executor.handle, request, None, query_id)
            await self._send(send, response, head_only)
            return
        response = await self._in_session(request, session_id, query_id, loop)
        await self._send(send, response, head_only)

    async def _in_session(
        self, request: Request, session_id: str, query_id: str, loop: asyncio.AbstractEventLoop
    ) -> Response:
        """Run on the session's own connection; one query at a time per session, as ClickHouse."""
        params = request.params
        session = self.sessions.get(session_id)
        if session is None:
            if params.get("session_check", "0") not in ("", "0"):
                error = ClickHouseError.new(SESSION_NOT_FOUND, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                return self.executor.error(error, query_id)
            session = Session()
            self.sessions[session_id] = session
        if session.busy:
            error = ClickHouseError.new(
                SESSION_IS_LOCKED, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client"
            )
            return self.executor.error(error, query_id)
        try:
            timeout = float(params.get("session_timeout") or session.timeout_s)
        except ValueError:
            timeout = session.timeout_s
        session.timeout_s = max(1.0, min(timeout, MAX_SESSION_TIMEOUT_S))
        session.busy = True
        try:
            if session.slot is None:
                session.slot = await loop.run_in_executor(self.pool, self.engine.new_slot, True)
            return await loop.run_in_executor(self.pool, self.executor.handle, request, session.slot, query_id)
        finally:
            session.busy = False
            session.last_used = time.monotonic()
            if params.get("close_session", "0") not in ("", "0"):
                self.sessions.pop(session_id, None)
                if session.slot is not None:
                    await loop.run_in_executor(self.pool, self.engine.drop_slot, session.slot)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.sessions.clear()


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after shutdown; we want to close chDB cleanly instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    host: str, port: int, data_path: str, *, workers: int = DEFAULT_WORKERS, settings: Settings | None = None
) -> None:
    """Serve the ClickHouse HTTP protocol over chDB on host:port until SIGINT/SIGTERM.

    Off loopback, requires the user and password of CLICKHOUSE_URL (``settings``, else the environment's)
    and raises SettingsError, before touching ``data_path``, when that URL has no password. Then opens (and
    so locks) ``data_path``, so a second instance on the same directory fails at once; on a signal,
    finishes in-flight requests, then closes every chDB connection.
    """
    auth = None if is_loopback(host) else Authenticator.off_loopback(host, settings or Settings.from_env())
    engine = Engine(data_path)
    app = App(engine, workers=workers, auth=auth)
    try:
        sock = _bind(host, port)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=30,
            server_header=False,
            date_header=True,
        )
        server = _Server(config)
        log.warning(
            "clickhouse-local (chDB %s, development/test endpoint) serving http://%s:%d, data %s, %s",
            engine.version,
            host,
            bound_port,
            engine.path,
            "any user and password (loopback)"
            if auth is None
            else f"user {auth.user!r} with CLICKHOUSE_URL's password",
        )
        server.run(sockets=[sock])
    finally:
        app.close()
        engine.close()
        log.warning("clickhouse-local stopped; data in %s", engine.path)


HELP = (
    "Embedded ClickHouse HTTP endpoint over chDB. This is a DEVELOPMENT AND TEST component: it lets "
    "the gateway, the stream workers, analysts and tests speak plain clickhouse-connect over HTTP on a "
    "machine without a ClickHouse server. It owns its data directory (chDB allows one process per "
    "directory). On loopback (the default, 127.0.0.1) it accepts any user/password; bound to another address it "
    "requires the user and password of CLICKHOUSE_URL and refuses to start when that URL has no password. "
    "Production points CLICKHOUSE_URL at a ClickHouse server instead of running this."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abstream.devstack.clickhouse_local", description=HELP)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1); off loopback, CLICKHOUSE_URL's user and password are required",
    )
    parser.add_argument("--port", type=int, default=8123, help="HTTP port (default 8123, ClickHouse's)")
    parser.add_argument("--path", required=True, help="chDB data directory (created if missing)")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"worker threads, each with its own chDB connection (default {DEFAULT_WORKERS})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.host, args.port, args.path, workers=args.workers)
    except SettingsError as exc:  # e.g. off loopback with no password in CLICKHOUSE_URL
        print(f"clickhouse-local: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"clickhouse-local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
