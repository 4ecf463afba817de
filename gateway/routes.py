"""The endpoint table: one declaration per route drives both the Starlette routing and /openapi.json."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    request: Any = None
    """A pydantic model or type (anything pydantic.TypeAdapter takes) describing the JSON body."""
    responses: dict[int, Any] = field(default_factory=dict)
    """status -> model/type of the body (None: no schema)."""
    admin: bool = False
    metrics: bool = False
    """Needs the metrics token (ABSTREAM_METRICS_TOKEN)."""
    description: str = ""
    query: tuple[dict[str, Any], ...] = ()
    """OpenAPI parameter objects of the query string."""
    path_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Schema of a path parameter when it is not an integer id."""
