"""/openapi.json, generated from the endpoint table and the pydantic models in schemas/ (never by hand)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter

from gateway.http_protocol import BODY_MIN_RATE, BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_HEAD_BYTES
from gateway.routes import Endpoint
from schemas.errors import ErrorResponse

_PARAM = re.compile(r"{([^}]+)}")
_REF = "#/components/schemas/{model}"


def _schema_of(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(tp).json_schema(ref_template=_REF, mode="serialization")
    components.update(schema.pop("$defs", {}))
    title = schema.get("title")
    if schema.get("type") == "object" and isinstance(title, str) and title.isidentifier():
        components.setdefault(title, schema)
        return {"$ref": _REF.format(model=title)}
    return schema


def _request_schema_of(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(tp).json_schema(ref_template=_REF, mode="validation")
    components.update(schema.pop("$defs", {}))
    return schema


def build_openapi(endpoints: Iterable[Endpoint], version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "summary": ep.summary,
            "tags": [ep.tag],
            "operationId": f"{ep.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', ep.path.lower()).strip('_')}",
        }
        if ep.description:
            op["description"] = ep.description
        params = [
            {"name": name, "in": "path", "required": True, "schema": ep.path_schemas.get(name, {"type": "integer"})}
            for name in _PARAM.findall(ep.path)
        ]
        params += list(ep.query)
        if ep.request is not None:
            params.append(_CONTENT_ENCODING)
            schema = _request_schema_of(ep.request, components)
            op["requestBody"] = {
                "required": True,
                "description": _BODY,
                "content": {"application/json": {"schema": schema}, "text/plain": {"schema": schema}},
            }
        if params:
            op["parameters"] = params
        # a body that does not arrive in time is refused by every route that reads one (gateway.plumbing)
        responses = {**ep.responses, 408: ErrorResponse} if ep.request is not None else ep.responses
        op["responses"] = {
            str(status): {
                "description": _DESCRIPTIONS.get(status, "answer"),
                **({"content": {"application/json": {"schema": _schema_of(model, components)}}} if model else {}),
                **({"headers": {"Retry-After": _RETRY_AFTER}} if status == 503 else {}),
            }
            for status, model in sorted(responses.items())
        }
        if ep.admin:
            op["security"] = [{"adminToken": []}]
        if ep.metrics:
            op["security"] = [{"metricsToken": []}]
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "abstream gateway",
            "version": version,
            "description": "Both API surfaces: Calicritters (/v1) and ArkForge (/apiv1), over one core. " + _CONNECTION,
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "ABSTREAM_ADMIN_TOKEN"},
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "ABSTREAM_METRICS_TOKEN"},
            },
        },
    }


_BODY = (
    "JSON, UTF-8. `text/plain` is read as JSON too (what `navigator.sendBeacon` and no-preflight `fetch` send). "
    "Integers must lie in [-2^63, 2^64-1] (`integer_out_of_range`). An object naming a key twice is refused whole "
    "(400 `duplicate_key`, the path of the key in `details`): readers disagree on which value counts. The body must "
    f"arrive within {BODY_TIMEOUT_S:.0f} s plus 1 s per {BODY_MIN_RATE:,} bytes (408 `body_timeout`)."
)
_CONNECTION = (
    'Every error answer is `{"error": {"code", "message", "details"}}`, those of the connection too: 431 '
    f"`headers_too_large` (request line and headers over {MAX_HEAD_BYTES // 1024} KiB), 408 `header_timeout` (a head "
    f"not complete within {HEAD_TIMEOUT_S:.0f} s), 400 `invalid_http` (not HTTP/1.1); the connection is then closed."
)
_CONTENT_ENCODING = {
    "name": "Content-Encoding",
    "in": "header",
    "required": False,
    "description": "Compressed body: gzip or deflate. Limits apply as sent and once decompressed, with a ratio "
    "cap against gzip bombs (413); other codings are 415.",
    "schema": {"type": "string", "enum": ["gzip", "x-gzip", "deflate", "identity"]},
}
_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}

_DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    400: "Invalid request: `error.details` names every bad field",
    401: "Missing bearer token",
    403: "Wrong bearer token",
    404: "Not found",
    408: "The body did not arrive in time (`body_timeout`); the connection is closed",
    409: "Conflict",
    413: "Body, decompressed body or batch too large",
    415: "Unsupported Content-Type or Content-Encoding",
    501: "Not implemented yet",
    503: "Kafka did not acknowledge (nothing accepted) or still starting; see Retry-After",
}
