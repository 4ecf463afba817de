"""The device side: how a simulated user's requests are sent, retried and answered, and the ledger of answers.

A request is sent as a mobile SDK would: JSON, sometimes gzip; on a connection error, a timeout or a
502/503/504 it is sent again, the same event_ids, with backoff (honouring ``Retry-After``) until
``retry_for_s`` has passed; a few requests are sent a second time after success (the answer was lost), and
those must come back as duplicates of events already stored, never as new ones. Every event's final answer
goes to the :class:`Ledger`, which is what the truth and the chaos table are built from.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


class GaveUp(Exception):
    """A request kept failing (connection errors or 5xx) for longer than retry_for_s."""


@dataclass
class Ledger:
    """Every answer the simulated devices got."""

    requests: int = 0
    gzip_requests: int = 0
    resent_after_success: int = 0
    retried: Counter[str] = field(default_factory=Counter)  # why a request was sent again: status or error
    failures: list[tuple[float, str]] = field(default_factory=list)  # (epoch s, why) of every failed attempt
    refused: Counter[str] = field(default_factory=Counter)  # whole requests refused: "400 code"
    rejected: Counter[str] = field(default_factory=Counter)  # single events rejected, by code
    refused_events: int = 0  # events inside requests refused whole
    events_sent: int = 0  # distinct events the devices sent (each once, whatever the retries)
    duplicates_flagged: int = 0
    gave_up_events: int = 0
    acked: dict[tuple[str, str], float] = field(default_factory=dict)  # (user, event_id) -> first ack (epoch s)
    unexpected: list[str] = field(default_factory=list)  # answers the scenario did not predict (first 20 kept)

    def note_unexpected(self, what: str) -> None:
        if len(self.unexpected) < 20:
            self.unexpected.append(what)


@dataclass
class Outcome:
    status: int
    body: Any


class Device:
    """One shared HTTP client for all simulated users (a connection pool, as many devices behind a NAT).

    aiohttp, not httpx: with 32 requests in flight httpx's pool spent ~70% of the run's CPU scanning its
    connections (cProfile: 4.7M ``is_idle`` calls for 3,841 requests), and the load client shares the box
    with the stack it measures. aiohttp is already installed (Faust's web server)."""

    def __init__(
        self,
        base_url: str,
        ledger: Ledger,
        *,
        admin_token: str = "",
        concurrency: int = 32,
        retry_for_s: float = 300.0,
        timeout_s: float = 10.0,
        on_ack: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.base_url = base_url
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self.ledger = ledger
        self.admin_token = admin_token
        self.retry_for_s = retry_for_s
        self.on_ack = on_ack

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:  # created inside the running loop, as aiohttp requires
            connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
            self._http = aiohttp.ClientSession(self.base_url, connector=connector, timeout=self.timeout,
                                               skip_auto_headers=("User-Agent",), auto_decompress=True)  # fmt: skip
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def request(
        self, method: str, path: str, body: Any = None, *, gzipped: bool = False, admin: bool = False
    ) -> Outcome:
        """Send until answered (anything but a retryable failure) or retry_for_s passes (GaveUp)."""
        headers = {"Content-Type": "application/json"}
        content = None
        if body is not None:
            content = orjson.dumps(body)
            if gzipped:
                content = gzip.compress(content, compresslevel=5)
                headers["Content-Encoding"] = "gzip"
                self.ledger.gzip_requests += 1
        if admin and self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            self.ledger.requests += 1
            try:
                async with self.http.request(method, path, data=content, headers=headers) as r:
                    raw = await r.read()
                    status, retry_after = r.status, r.headers.get("Retry-After", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
            else:
                if status not in RETRY_STATUSES:
                    return Outcome(status, _json(raw))
                why = str(status)
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 5.0))
            self.ledger.retried[why] += 1
            self.ledger.failures.append((time.time(), why))
            if time.monotonic() + delay > deadline:
                raise GaveUp(f"{method} {path}: still failing ({why}) after {self.retry_for_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def ingest(self, user_id: str, path: str, body: Any, event_ids: list[str], *, gzipped: bool) -> list[bool]:
        """Send one ingestion request; True per event that was acknowledged (accepted, duplicate or not)."""
        self.ledger.events_sent += len(event_ids)
        try:
            out = await self.request("POST", path, body, gzipped=gzipped)
        except GaveUp as exc:
            self.ledger.gave_up_events += len(event_ids)
            self.ledger.note_unexpected(str(exc))
            return [False] * len(event_ids)
        return self.settle(user_id, out, event_ids)

    def settle(self, user_id: str, out: Outcome, event_ids: list[str]) -> list[bool]:
        """Record one ingestion answer in the ledger."""
        if out.status != 200 or not isinstance(out.body, dict) or "results" not in out.body:
            code = _error_code(out.body)
            self.ledger.refused[f"{out.status} {code}"] += 1
            self.ledger.refused_events += len(event_ids)
            return [False] * len(event_ids)
        now = time.time()
        acked = []
        for event_id, result in zip(event_ids, out.body["results"], strict=True):
            if result.get("status") == "accepted":
                key = (user_id, event_id)
                if key not in self.ledger.acked:
                    self.ledger.acked[key] = now
                    if self.on_ack is not None:
                        self.on_ack(user_id, event_id, now)
                if result.get("duplicate"):
                    self.ledger.duplicates_flagged += 1
                acked.append(True)
            else:
                self.ledger.rejected[str(result.get("code"))] += 1
                acked.append(False)
        return acked


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace")


def _error_code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code"))
    return "?"
