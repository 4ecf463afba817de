"""The one error shape every endpoint of both API surfaces answers with.

``{"error": {"code": "...", "message": "...", "details": [{"field": "...", "code": "...", "message": "..."}]}}``
``code`` is machine-readable and stable; ``message`` is for people; ``details`` names each bad field
(dotted path, list indexes as numbers, e.g. ``events.3.occurred_at``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError


class FieldError(BaseModel):
    field: str
    code: str
    message: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[FieldError] = []


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorInfo


@dataclass
class ApiError(Exception):
    """Raised anywhere below a route; the gateway turns it into ``ErrorResponse`` with ``status``."""

    status: int
    code: str
    message: str
    details: list[dict[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    sent: object = field(default=None, repr=False, compare=False)
    """What the client sent (the body's bytes, or its parsed JSON), for the dead letter of a refused request."""
    dead_lettered: bool = field(default=False, repr=False, compare=False)
    """Already recorded in ``events.rejected`` (a single-event endpoint's rejected event)."""

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("events", 3, "occurred_at")`` -> ``"events.3.occurred_at"``; the body itself is ``"body"``."""
    return ".".join(str(part) for part in loc) or "body"


def validation_failed(exc: ValidationError, message: str = "request validation failed") -> ApiError:
    """Turn a pydantic ValidationError into a 400 naming every bad field with a machine-readable code."""
    details = [
        {"field": field_path(err["loc"]), "code": err["type"], "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    return ApiError(400, "validation_failed", message, details)
