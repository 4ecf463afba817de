"""The asyncio load client: a hand-written HTTP/1.1 keep-alive client that replays a pool file against a URL,
run as its own process (``python -m abstream.bench.http_client URL POOL``), never in the benchmark's process.

At a fixed ``--rate`` it is an open loop, each request's latency counted from its *scheduled* send time, so a
stalled server cannot hide its queue by slowing the client down (no coordinated omission, as wrk2 does it); it
is the fallback of ``openloop.c`` (the same schedule and accounting at ~1.5-2.5x the CPU per request). With
``--rate 0`` it is a closed loop, the fallback for wrk. It prints one JSON line: ``report.client_summary``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from abstream.bench.payloads import read_pool
from abstream.bench.report import client_summary

TICK_S = 0.001


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; parses responses with Content-Length (all the gateway sends)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: Any = None
        self.buf = bytearray()
        self.need = -1
        self.body_at = 0
        self.status = 0
        self.scheduled = 0.0
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while buf:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self.client.fail(self, "response without Content-Length")
                    return
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop > 0 else len(head)])
                self.body_at = end + 4
                self.need = self.body_at + length
            if len(buf) < self.need:
                return
            body = bytes(buf[self.body_at : self.need])
            del buf[: self.need]
            self.need = -1
            self.client.done(self, self.status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self, exc)


class _Client:
    """Open loop at ``rate`` requests/s (``rate == 0``: closed loop, every connection sends back to back)."""

    def __init__(self, args: argparse.Namespace, requests: list[bytes]) -> None:
        self.args = args
        self.requests = requests
        self.next_request = 0
        self.idle: deque[_Conn] = deque()
        self.pending: deque[float] = deque()
        self.in_flight = 0
        self.measure_from = 0.0
        self.measure_until = float("inf")
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lateness: list[float] = []
        self.statuses: dict[int, int] = {}
        self.accepted = 0
        self.duplicates = 0
        self.errors: list[str] = []
        self.first_done = 0.0
        self.last_done = 0.0
        self.stopping = False
        self.all_done = asyncio.Event()
        self.queued = 0
        self.conns: list[_Conn] = []
        self.connecting = 0
        self.tasks: set[asyncio.Future[None]] = set()

    def _request(self) -> bytes:
        req = self.requests[self.next_request]
        self.next_request = (self.next_request + 1) % len(self.requests)
        return req

    def pump(self) -> None:
        while self.pending and self.idle:
            conn = self.idle.popleft()
            self.in_flight += 1
            conn.send(self._request(), self.pending.popleft())
        # Open loop: a request due while every connection is busy gets a new connection (as many independent
        # clients would have), up to --max-connections; past that it waits, and the wait counts.
        want = min(len(self.pending) - self.connecting, self.args.max_connections - len(self.conns) - self.connecting)
        for _ in range(max(0, want)):
            self.connecting += 1
            task = asyncio.ensure_future(self._connect())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.args.host, self.args.port
            )
        except OSError as exc:
            self.errors.append(f"connect: {exc}")
            return
        finally:
            self.connecting -= 1
        self.conns.append(conn)
        self.idle.append(conn)
        self.pump()

    def done(self, conn: _Conn, status: int, body: bytes) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        if self.measure_from <= conn.scheduled < self.measure_until:
            # From the scheduled time when the request left late (the wait is the server's doing, or ours:
            # send_lateness_ms tells), from the actual send when a tick released it up to 0.5 ms early.
            self.latencies.append((now - min(conn.scheduled, conn.sent)) * 1000)
            self.service.append((now - conn.sent) * 1000)
            self.lateness.append((conn.sent - conn.scheduled) * 1000)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if not self.first_done:
                self.first_done = now
            self.last_done = now
            if status == 200 and self.args.events:
                self.accepted += _int_after(body, b'"accepted":')
                self.duplicates += _int_after(body, b'"duplicates":')
        if self.args.rate <= 0:  # closed loop
            if not self.stopping:
                self.in_flight += 1
                conn.send(self._request(), time.perf_counter())
                return
        else:
            self.idle.append(conn)
            self.pump()
        if self.stopping and self.in_flight == 0 and not self.pending:
            self.all_done.set()

    def fail(self, conn: _Conn, why: str) -> None:
        self.errors.append(why)
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        if not self.stopping:
            self.errors.append(f"connection lost: {exc}")
            self.stopping = True
            self.all_done.set()

    async def run(self) -> dict[str, Any]:
        a = self.args
        loop = asyncio.get_running_loop()
        for _ in range(a.connections):
            _, conn = await loop.create_connection(lambda: _Conn(self), a.host, a.port)
            self.conns.append(conn)
        self.idle.extend(self.conns)
        start = time.perf_counter() + 0.02
        self.measure_from = start + a.warmup
        self.measure_until = self.measure_from + a.duration
        total_s = a.warmup + a.duration
        try:
            if a.rate > 0:
                await self._open_loop(start, total_s)
            else:
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
                for conn in list(self.idle):
                    self.in_flight += 1
                    conn.send(self._request(), time.perf_counter())
                self.idle.clear()
                await asyncio.sleep(total_s)
            self.stopping = True
            if self.in_flight or self.pending:
                try:
                    await asyncio.wait_for(self.all_done.wait(), 15)
                except TimeoutError:
                    self.errors.append(f"{self.in_flight + len(self.pending)} requests unanswered after 15 s")
        finally:
            for conn in self.conns:
                if conn.transport is not None:
                    conn.transport.close()
        return self.summary()

    async def _open_loop(self, start: float, total_s: float) -> None:
        """Release every request whose scheduled time is within half a tick; sleep a tick (1 ms, the event
        loop's timer resolution: shorter sleeps spin and starve the server of CPU on a small box)."""
        rate = self.args.rate
        total = int(rate * total_s)
        half_tick = TICK_S / 2
        i = 0
        while i < total and not self.stopping:
            due = min(total, int((time.perf_counter() + half_tick - start) * rate) + 1)
            if due > i:
                if not self.idle:
                    self.queued += due - i
                self.pending.extend(start + k / rate for k in range(i, due))
                i = due
                self.pump()
            await asyncio.sleep(max(TICK_S, start + i / rate - time.perf_counter() - half_tick))

    def summary(self) -> dict[str, Any]:
        a = self.args
        return client_summary(
            client=(
                f"python asyncio, open loop, {a.connections}..{a.max_connections} connections"
                if a.rate > 0
                else f"python asyncio, closed loop, {a.connections} connections"
            ),
            rate=a.rate,
            duration_s=a.duration,
            warmup_s=a.warmup,
            count_events=a.events,
            latencies=self.latencies,
            service=self.service,
            lateness=self.lateness,
            statuses=self.statuses,
            error_samples=self.errors,
            error_count=len(self.errors),
            measure_from=self.measure_from,
            last_done=self.last_done,
            queued=self.queued,
            connections_used=len(self.conns),
            accepted=self.accepted,
            duplicates=self.duplicates,
        )


def _int_after(body: bytes, marker: bytes) -> int:
    at = body.find(marker)
    if at < 0:
        return 0
    at += len(marker)
    end = at
    while end < len(body) and 48 <= body[end] <= 57:
        end += 1
    return int(body[at:end] or 0)


def http_requests(url: str, bodies: Sequence[bytes], gzip_bodies: bool) -> tuple[str, int, list[bytes]]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        + ("Content-Encoding: gzip\r\n" if gzip_bodies else "")
    ).encode()
    return host, port, [head + b"Content-Length: %d\r\n\r\n" % len(b) + b for b in bodies]


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop (as uvicorn runs the gateway) when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    """The load process: replay a pool file against a URL; print one JSON line of results."""
    parser = argparse.ArgumentParser(prog="python -m abstream.bench.http_client", description=main.__doc__)
    parser.add_argument("url", help="e.g. http://127.0.0.1:20000/v1/events")
    parser.add_argument("pool", type=Path, help="pool file of request bodies (see write_pool)")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s, open loop (0: closed loop)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=64, help="connections opened up front")
    parser.add_argument(
        "--max-connections", type=int, default=512, help="open loop: more connections when all are busy, up to this"
    )
    parser.add_argument("--gzip", action="store_true", help="bodies are gzip: send Content-Encoding: gzip")
    parser.add_argument("--no-events", dest="events", action="store_false", help="do not count accepted events")
    args = parser.parse_args(argv)
    args.host, args.port, requests = http_requests(args.url, read_pool(args.pool), args.gzip)
    gc.collect()
    gc.freeze()
    gc.disable()  # a collection pause would be charged to the server's latency
    try:
        result = run_async(_Client(args, requests).run())
    except KeyboardInterrupt:
        return 130
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
