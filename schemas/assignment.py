"""The Calicritters surface's assignment payloads: ``POST /v1/assignment``, its body and its answer.

Requests ignore unknown fields, as the seed server did. Validate a request with
``context={"settings": settings}`` so ids follow ``Settings.max_id_length``.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from schemas.fields import IdStr, JsonObject, Platform

_TOLERANT = ConfigDict(extra="ignore")


class AssignmentRequest(BaseModel):
    """Body of POST /v1/assignment. Validate with ``context={"settings": settings}`` for the id limit."""

    model_config = _TOLERANT

    anonymous_user_id: IdStr
    platform: Platform | None = None
    app_version: IdStr | None = None
    session_id: IdStr | None = None
    install_id: IdStr | None = None


class AssignmentEntry(BaseModel):
    experiment_key: str
    experiment_id: int
    variant_key: str
    variant_id: int
    variant_name: str
    phase: int


class AssignmentResponse(BaseModel):
    """Answer of POST /v1/assignment: the user's assignments (ascending experiment id) and merged config."""

    anonymous_user_id: str
    assignments: list[AssignmentEntry]
    config: JsonObject
    assignment_version: str
    generated_at: datetime
