"""The `experiments` topic record: one version of one experiment (key = experiment key, compacted), and the
pure fold of those records (``RegistryState``) that every gateway replica and the workers' registry copy apply.

Every gateway replica folds the topic in order into the same registry (see gateway.registry); the
workers copy each version into ClickHouse `experiments` / `experiment_variants`, and the gateway
restores an empty topic from there. The fold lives here, beside the record, so the workers use it
without importing the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from hashlib import sha256
from typing import Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from schemas.analysis import MetricDefinition
from schemas.experiments import Experiment, Status, Targeting


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


def assignment_version(experiments: Iterable[Experiment]) -> str:
    """16 lowercase hex chars: SHA-256 of the experiments' canonical JSON (sorted by id, sorted keys).

    Changes with any change to the set or the content of experiments; equal on every replica holding
    equal experiments, whatever order they were loaded in.
    """
    dumped = sorted((e.model_dump(mode="json") for e in experiments), key=lambda d: d["id"])
    return sha256(orjson.dumps(dumped, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


@dataclass
class RegistryState:
    """The pure fold of the `experiments` topic. Same records in the same order: same state, everywhere."""

    def __init__(self) -> None:
        self.records: dict[str, RegistryRecord] = {}
        self.key_by_id: dict[int, str] = {}
        self.key_by_name: dict[str, str] = {}
        self._refresh()

    def apply(self, record: RegistryRecord) -> bool:
        """Apply one record; return whether it changed the registry."""
        exp = record.experiment
        current = self.records.get(exp.key)
        if record.op == "create":
            if current is not None or exp.id in self.key_by_id or exp.name in self.key_by_name:
                return False  # first writer wins
        else:
            if current is None or current.experiment.id != exp.id:
                return False
            owner = self.key_by_name.get(exp.name)
            if owner is not None and owner != exp.key:
                return False
            self.key_by_name.pop(current.experiment.name, None)
        self.records[exp.key] = record
        self.key_by_id[exp.id] = exp.key
        self.key_by_name[exp.name] = exp.key
        self._refresh()
        return True

    def _refresh(self) -> None:
        experiments = sorted((r.experiment for r in self.records.values()), key=lambda e: e.id)
        self.experiments: list[Experiment] = experiments
        self.live: list[Experiment] = [e for e in experiments if e.status is not Status.DRAFT]
        self.version: str = assignment_version(experiments)

    def by_id(self, experiment_id: int) -> Experiment | None:
        key = self.key_by_id.get(experiment_id)
        return self.records[key].experiment if key is not None else None

    def by_key(self, key: str) -> Experiment | None:
        record = self.records.get(key)
        return record.experiment if record else None

    def next_id(self) -> int:
        return max(self.key_by_id, default=0) + 1


class VariantEdit(BaseModel):
    """A variant in an edit: matched to the current variant by ``key`` (keeps its id)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    name: str | None = None
    description: str | None = None
    weight: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    config_overrides: dict[str, Any] | None = None
    control: bool | None = None


class ExperimentEdit(BaseModel):
    """Body of PATCH /apiv1/ab-tests/{test_id}: only the fields given change.

    Edits that would move already-assigned users of a RUNNING or PAUSED experiment (weights, variants,
    seed, lower coverage, narrower targeting) are refused with 409 ``edit_would_move_users`` unless
    ``new_phase`` is true: then the experiment starts phase N+1 with a new hash seed (``hash_seed`` or
    ``<key>.p<N+1>``), users are re-randomised, and later assignments carry the new phase.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    status: Status | None = None
    start_at: AwareDatetime | None = None
    end_at: AwareDatetime | None = None
    coverage: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    targeting: Targeting | None = None
    baseline_config: dict[str, Any] | None = None
    variants: list[VariantEdit] | None = Field(default=None, min_length=2)
    new_phase: bool = False
    hash_seed: str | None = None
    metrics: list[MetricDefinition] | None = Field(default=None, description="null: back to the default metrics")
    exposure_event: str | None = Field(default=None, description="null: exposure at the first assignment")
    cuped_lookback_days: StrictInt | None = Field(default=None, ge=0, le=90)
    sequential_testing: StrictBool | None = None

    def apply(self, current: Experiment, now: datetime) -> Experiment:
        """The edited experiment (validated); ids of variants kept by key, new variants get fresh ids."""
        data = current.model_dump(mode="python")
        for name in ("name", "description", "status", "start_at", "end_at", "coverage", "baseline_config",
                     "cuped_lookback_days", "sequential_testing"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if "exposure_event" in self.model_fields_set:  # null given: back to the first assignment
            data["exposure_event"] = self.exposure_event
        if self.targeting is not None:
            data["targeting"] = self.targeting.model_dump(mode="python")
        if "metrics" in self.model_fields_set:  # null given: back to the default metrics
            data["metrics"] = None if self.metrics is None else [m.model_dump(mode="python") for m in self.metrics]
        if self.variants is not None:
            by_key = {v["key"]: v for v in data["variants"]}
            next_id = max((v["id"] for v in data["variants"]), default=current.id * 1000) + 1
            variants = []
            for edit in self.variants:
                base = dict(by_key.get(edit.key) or {"key": edit.key, "id": None, "name": edit.key})
                if base["id"] is None:
                    base["id"], next_id = next_id, next_id + 1
                for name in ("name", "description", "weight", "config_overrides", "control"):
                    value = getattr(edit, name)
                    if value is not None:
                        base[name] = value
                if "weight" not in base:
                    raise ValueError(f"variant {edit.key!r} is new: it needs a weight")
                variants.append(base)
            data["variants"] = variants
        if self.new_phase:
            data["phase"] = current.phase + 1
            data["phase_started_at"] = now
            data["hash_seed"] = self.hash_seed or f"{current.key}.p{current.phase + 1}"
        elif self.hash_seed is not None:
            data["hash_seed"] = self.hash_seed
        return Experiment.model_validate(data)
