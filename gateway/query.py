"""Query strings read into the models of schemas/: every parameter checked, unknown and repeated ones refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import QueryParams

from schemas.errors import ApiError, field_path


def parse_query(model: type[BaseModel], params: QueryParams) -> Any:
    """The query string as ``model``: 400 ``invalid_parameter`` naming each bad or unknown parameter."""
    items = params.multi_items()
    repeated = sorted({k for k, _ in items if sum(1 for k2, _ in items if k2 == k) > 1})
    details = [{"field": k, "code": "repeated_parameter", "message": f"{k} given more than once"} for k in repeated]
    if not details:
        try:
            return model.model_validate(dict(items))
        except ValidationError as exc:
            details = [
                {"field": field_path(err["loc"]) if err["loc"] else "query", "code": err["type"], "message": err["msg"]}
                for err in exc.errors(include_url=False, include_input=False)
            ]
    names = ", ".join(d["field"] for d in details)
    raise ApiError(400, "invalid_parameter", f"invalid query parameter(s): {names}", details)
