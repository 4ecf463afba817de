"""Health answers of the gateway (for orchestrators' probes and /openapi.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Liveness(BaseModel):
    """``GET /health/live``: the process answers (restart it only when this fails)."""

    status: Literal["live"]


class Readiness(BaseModel):
    """``GET /health/ready``: 200 when ready for traffic, 503 (same shape) while not."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(
        description="kafka: the producer is connected and Kafka answers; registry: experiments loaded."
    )
    error: str | None = Field(None, description="Why start-up failed, when it did (e.g. a malformed tests.json).")
