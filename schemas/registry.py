"""The `experiments` topic record: one version of one experiment (key = experiment key, compacted).

Every gateway replica folds the topic in order into the same registry (see gateway.registry); the
workers copy each version into ClickHouse `experiments` / `experiment_variants`, and the gateway
restores an empty topic from there.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas.experiments import Experiment


class RegistryRecord(BaseModel):
    """``op="create"`` applies only if neither the key nor the id is taken (first writer wins);
    ``op="update"`` applies only to an existing experiment with the same key and id."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    op: Literal["create", "update"]
    experiment: Experiment
    source: Literal["manifest", "api", "restore"]
    request_id: str = Field(description="Who wrote this version; lets a writer see whether it won.")
    written_at: int = Field(description="Epoch milliseconds (UTC).")
    manifest_sha: str | None = Field(
        default=None, description="Hash of the tests.json entry last applied, so unchanged entries are not reapplied."
    )

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes | str) -> RegistryRecord:
        return cls.model_validate(orjson.loads(data))
