"""Bearer tokens, compared in constant time: the admin token (create and change experiments) and the metrics
token (the protected /v1/metrics endpoints). They are separate secrets: neither opens the other's endpoints."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request

from abstream.config import Settings
from schemas.errors import ApiError


def _bearer_token(request: Request, variable: str, realm: str, what: str) -> str:
    """The request's bearer token; 401 naming ``variable`` without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            f"this {what} needs 'Authorization: Bearer <{variable}>'",
            headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
        )
    return token.strip()


def _matches(token: str, expected: str) -> bool:
    return hmac.compare_digest(token.encode(), expected.encode())


def require_admin(request: Request, settings: Settings) -> None:
    """401 without a bearer token, 403 with a wrong one; no check when ABSTREAM_ADMIN_TOKEN is empty."""
    if not settings.admin_token:
        return
    token = _bearer_token(request, "ABSTREAM_ADMIN_TOKEN", "abstream", "operation")
    if not _matches(token, settings.admin_token):
        raise ApiError(403, "forbidden", "the bearer token is not valid for this operation")


def require_metrics(request: Request, settings: Settings) -> None:
    """401 without a bearer token, 403 with a wrong one (the admin token included), 403
    ``metrics_token_not_configured`` when ABSTREAM_METRICS_TOKEN is empty: no token can be right then."""
    token = _bearer_token(request, "ABSTREAM_METRICS_TOKEN", "abstream-metrics", "endpoint")
    if not settings.metrics_token:
        raise ApiError(403, "metrics_token_not_configured", "the metrics API is off: ABSTREAM_METRICS_TOKEN is not set")
    if not _matches(token, settings.metrics_token):
        raise ApiError(403, "forbidden", "the bearer token is not valid for the metrics API")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(settings: Settings) -> str | None:
    """Why the gateway must not start as configured, or None: bound off loopback with no ABSTREAM_ADMIN_TOKEN,
    anyone who reaches the port could create and change experiments."""
    if settings.admin_token or is_loopback(settings.gateway_host):
        return None
    return (
        f"the gateway would listen on {settings.gateway_host} (off loopback) with no ABSTREAM_ADMIN_TOKEN, leaving "
        "experiment changes open to the network: set ABSTREAM_ADMIN_TOKEN, or bind 127.0.0.1"
    )
