"""How every abstream process reaches ClickHouse: plain clickhouse-connect over HTTP, from CLICKHOUSE_URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.asyncclient import AsyncClient
from clickhouse_connect.driver.client import Client

from abstream.config import Settings, redacted_url

_DEFAULT = object()


def connect_args(settings: Settings, database: Any = _DEFAULT, **extra: Any) -> dict[str, Any]:
    """clickhouse-connect arguments for CLICKHOUSE_URL; ``database=None`` connects without one."""
    url = urlsplit(settings.clickhouse_url)
    args: dict[str, Any] = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or (8443 if url.scheme == "https" else 8123),
        "username": unquote(url.username or "default"),
        "password": unquote(url.password or ""),
        "secure": url.scheme == "https",
        "compress": "lz4",
        "connect_timeout": 5,
        "send_receive_timeout": 60,
        "autogenerate_session_id": False,
    }
    db = settings.clickhouse_database if database is _DEFAULT else database
    if db:
        args["database"] = db
    args.update(extra)
    return args


def public_url(settings: Settings) -> str:
    """CLICKHOUSE_URL without its password (a message must not print a secret), with the port in use."""
    return redacted_url(settings.clickhouse_url, connect_args(settings)["port"])


def describe_failure(settings: Settings, exc: BaseException) -> str:
    """One line for a failed ClickHouse call: not reachable, or the server's own error (code and name). The
    reason is the innermost cause, e.g. ``[Errno 111] Connection refused`` rather than urllib3's retry wrapper
    around it (which repeats the URL and a query id), cut to 300 characters after the hint is decided."""
    from clickhouse_connect.driver.exceptions import OperationalError

    where = f"ClickHouse at {public_url(settings)} (CLICKHOUSE_URL)"
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    reason = text if len(text) <= 300 else text[:300] + "…"
    if isinstance(exc, OperationalError):
        return f"cannot reach {where}: {reason}"
    hint = "; run `abstream migrate` first" if "UNKNOWN_DATABASE" in text or "UNKNOWN_TABLE" in text else ""
    return f"{where} answered with an error: {reason}{hint}"


def client(settings: Settings, **extra: Any) -> Client:
    return clickhouse_connect.get_client(**connect_args(settings, **extra))


async def async_client(settings: Settings, **extra: Any) -> AsyncClient:
    return await clickhouse_connect.get_async_client(**connect_args(settings, **extra))
