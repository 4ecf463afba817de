"""The ``assignments`` Kafka topic's record (key = user id): which variant a user was assigned, published by
the gateway and joined onto that user's events by the stream workers."""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas.fields import Platform, Surface


class AssignmentRecord(BaseModel):
    """One exposure-to-assignment fact, published by the gateway, joined onto events by the workers.

    Readers ignore unknown fields so producers can add optional ones without bumping ``v``.
    """

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    user_id: str
    experiment_key: str
    experiment_id: int
    variant_key: str
    variant_id: int
    phase: int
    assignment_version: str
    assigned_at: int = Field(description="Epoch milliseconds (UTC).")
    platform: Platform | None = None
    app_version: str | None = None
    surface: Surface

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | str) -> AssignmentRecord:
        return cls.model_validate(orjson.loads(data))
