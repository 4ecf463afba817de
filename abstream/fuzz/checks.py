"""What counts as a failure of one answer, in two kinds the final table keeps apart.

* server error: a 5xx other than a documented 503 that carries Retry-After (Kafka or ClickHouse not answering is
  the contract; anything else is a bug), or no answer at all (reset, closed, timed out);
* schema mismatch: a status the operation does not document, a body or header that does not match its
  documented schema (Schemathesis' conformance checks), or an error answer not in the one documented shape
  ``{"error": {"code", "message", "details"?}}``, whatever its status (404/405 of the router and the refusals
  of the connection included).

Schema-valid requests refused (a time window, an unknown test id, a rule the schema cannot say) and requests with
invalid data accepted (the ingestion endpoints answer 200 with per-event rejections, unknown fields are ignored)
are the documented contract, so Schemathesis' positive/negative acceptance checks are not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import requests
    from schemathesis import Case

SERVER_ERROR = "server error"
SCHEMA_MISMATCH = "schema mismatch"


@dataclass(frozen=True)
class Problem:
    kind: str
    """SERVER_ERROR or SCHEMA_MISMATCH."""
    title: str
    detail: str


def server_error(status: int, headers: Any, documented: set[int]) -> Problem | None:
    """A 5xx that is not a documented 503 with Retry-After."""
    if status < 500:
        return None
    if status == 503 and 503 in documented and headers.get("retry-after"):
        return None
    return Problem(SERVER_ERROR, f"{status} answer", "a server error other than a documented 503 with Retry-After")


def error_shape(status: int, body: bytes) -> Problem | None:
    """An answer of 400 or more must be the documented error object, nothing more."""
    if status < 400:
        return None
    why = _shape_error(body)
    return None if why is None else Problem(SCHEMA_MISMATCH, "error shape", why)


def _shape_error(body: bytes) -> str | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"not JSON: {body[:120]!r}"
    if type(doc) is not dict or set(doc) != {"error"} or type(doc["error"]) is not dict:
        return 'not {"error": {...}}'
    error = doc["error"]
    if not {"code", "message"} <= set(error) <= {"code", "message", "details"}:
        return f"error keys {sorted(error)}; want code, message and optionally details"
    if type(error["code"]) is not str or not error["code"] or type(error["message"]) is not str:
        return "code and message must be strings (code not empty)"
    details = error.get("details", [])
    if type(details) is not list or any(
        type(d) is not dict or set(d) != {"field", "code", "message"} or not all(type(v) is str for v in d.values())
        for d in details
    ):
        return "details must be a list of {field, code, message} strings"
    return None


def conformance(case: Case, response: requests.Response) -> list[Problem]:
    """Schemathesis' conformance checks: documented status, content type, body schema and headers."""
    from schemathesis.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.core.failures import Failure, FailureGroup

    checks = [status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]  # fmt: skip
    try:
        case.validate_response(response, checks=checks)
    except FailureGroup as group:
        return [_problem(f) for f in group.exceptions]
    except Failure as failure:
        return [_problem(failure)]
    return []


def _problem(failure: Exception) -> Problem:
    title = getattr(failure, "title", None) or type(failure).__name__
    message = getattr(failure, "message", None) or str(failure)
    return Problem(SCHEMA_MISMATCH, str(title), " ".join(str(message).split())[:400])
