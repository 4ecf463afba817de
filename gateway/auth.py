"""Admin authentication for creating and changing experiments: a bearer token compared in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from abstream.config import Settings
from schemas.errors import ApiError


def require_admin(request: Request, settings: Settings) -> None:
    """401 without a bearer token, 403 with a wrong one; no check when ABSTREAM_ADMIN_TOKEN is empty."""
    expected = settings.admin_token
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "this operation needs 'Authorization: Bearer <ABSTREAM_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="abstream"'},
        )
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(403, "forbidden", "the bearer token is not valid for this operation")
