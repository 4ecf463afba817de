"""The ArkForge surface's experiment payloads (``/apiv1/ab-tests``): create a test, show one, assign a user.

Seed field names throughout (``test_name``, ``variant_name``); requests ignore unknown fields, as the seed
server did, so existing clients that send extras keep working. A created test becomes a manifest
``Experiment`` (``ABTestCreate.to_experiment``) and is shown from one (``ABTestOut.from_experiment``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, model_validator
from pydantic_core import InitErrorDetails

from schemas.analysis import (
    DEFAULT_CUPED_LOOKBACK_DAYS,
    MAX_CUPED_LOOKBACK_DAYS,
    MAX_METRICS,
    MetricDefinition,
)
from schemas.buckets import BUCKETS, bucket_counts
from schemas.experiments import MAX_VARIANTS, Experiment, Status, Variant
from schemas.fields import IdStr, field_error, raise_field_errors
from schemas.names import EventName

_TOLERANT = ConfigDict(extra="ignore")
_SLUG_RE = re.compile(r"[^a-z0-9]+")


def key_from_name(name: str, experiment_id: int, taken: Iterable[str] = ()) -> str:
    """An experiment key for an ArkForge test: the test_name slugged (``Homepage Button!`` -> ``homepage_button``),
    suffixed ``_<id>`` when taken, ``test_<id>`` when nothing sluggable is left."""
    slug = _SLUG_RE.sub("_", name.lower()).strip("_")[:48].strip("_")
    taken_set = set(taken)
    if not slug:
        return f"test_{experiment_id}"
    if slug in taken_set:
        return f"{slug}_{experiment_id}"
    return slug


class ABVariantCreate(BaseModel):
    model_config = _TOLERANT

    variant_name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    control: bool = Field(default=False, description="The control results compare against (default: the first).")


class ABTestCreate(BaseModel):
    """Body of POST /apiv1/ab-tests (seed field names)."""

    model_config = _TOLERANT

    test_name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    variants: list[ABVariantCreate] = Field(min_length=2, max_length=MAX_VARIANTS)
    metrics: list[MetricDefinition] | None = Field(default=None, max_length=MAX_METRICS)
    exposure_event: EventName | None = None
    cuped_lookback_days: StrictInt = Field(default=DEFAULT_CUPED_LOOKBACK_DAYS, ge=0, le=MAX_CUPED_LOOKBACK_DAYS)
    sequential_testing: StrictBool = False

    @model_validator(mode="after")
    def _distinct_names(self) -> ABTestCreate:
        seen: set[str] = set()
        errors: list[InitErrorDetails] = []
        for i, variant in enumerate(self.variants):
            if variant.variant_name in seen:
                errors.append(
                    field_error(
                        ("variants", i, "variant_name"),
                        "duplicate_name",
                        f"duplicate variant_name {variant.variant_name!r}",
                        variant.variant_name,
                    )
                )
            seen.add(variant.variant_name)
        counts = bucket_counts([v.weight for v in self.variants])
        errors.extend(
            field_error(("variants", i, "weight"), "weight_too_small", f"weight gets 0 of {BUCKETS} buckets", v.weight)
            for i, (v, c) in enumerate(zip(self.variants, counts, strict=True))
            if c == 0
        )
        raise_field_errors("ABTestCreate", errors)
        return self

    def to_experiment(self, experiment_id: int, now: datetime, taken_keys: Iterable[str] = ()) -> Experiment:
        """The registry entry for this test: RUNNING at once (the seed assigns right after creation),
        key from ``key_from_name``, variants keyed A, B, C... (then V27...) with derived ids."""
        key = key_from_name(self.test_name, experiment_id, taken_keys)
        return Experiment(
            key=key,
            id=experiment_id,
            name=self.test_name,
            description=self.description or "",
            status=Status.RUNNING,
            hash_seed=key,
            phase_started_at=now,
            created_at=now,
            variants=[
                Variant(
                    key=chr(ord("A") + i) if i < 26 else f"V{i + 1}",
                    name=v.variant_name,
                    description=v.description or "",
                    weight=v.weight,
                    control=v.control,
                )
                for i, v in enumerate(self.variants)
            ],
            metrics=self.metrics,
            exposure_event=self.exposure_event,
            cuped_lookback_days=self.cuped_lookback_days,
            sequential_testing=self.sequential_testing,
        )


class ABVariantOut(BaseModel):
    """A variant as GET /apiv1/ab-tests shows it: the seed's ab_variants columns plus ``key``."""

    id: int
    test_id: int
    variant_name: str
    description: str | None
    weight: float = Field(description="Normalised share (weights of a test sum to 1).")
    created_at: datetime | None
    key: str
    is_control: bool = Field(description="The variant results compare against.")


class ABTestOut(BaseModel):
    """A test as GET /apiv1/ab-tests(/{test_id}) shows it: the seed's ab_tests columns plus status and key."""

    id: int
    test_name: str
    description: str | None
    created_at: datetime | None
    status: Status
    key: str
    phase: int = Field(description="Current phase: a new phase (new hash seed) re-randomises users.")
    variants: list[ABVariantOut]
    metrics: list[MetricDefinition] | None = Field(description="Metrics results analyse; null: the default set.")
    exposure_event: str | None
    cuped_lookback_days: int
    sequential_testing: bool

    @classmethod
    def from_experiment(cls, experiment: Experiment) -> ABTestOut:
        created = experiment.created_at or experiment.start_at or experiment.phase_started_at
        total = sum(v.weight for v in experiment.variants)
        return cls(
            id=experiment.id,
            test_name=experiment.name,
            description=experiment.description,
            created_at=created,
            status=experiment.status,
            key=experiment.key,
            phase=experiment.phase,
            variants=[
                ABVariantOut(
                    id=v.variant_id,
                    test_id=experiment.id,
                    variant_name=v.name,
                    description=v.description,
                    weight=v.weight / total,
                    created_at=created,
                    key=v.key,
                    is_control=v is experiment.control,
                )
                for v in experiment.variants
            ],
            metrics=experiment.metrics,
            exposure_event=experiment.exposure_event,
            cuped_lookback_days=experiment.cuped_lookback_days,
            sequential_testing=experiment.sequential_testing,
        )


class ABAssignRequest(BaseModel):
    """Body of POST /apiv1/ab-tests/{test_id}/assign."""

    model_config = _TOLERANT

    user_id: IdStr


class ABAssignResponse(BaseModel):
    """Answer of POST /apiv1/ab-tests/{test_id}/assign. ``assigned`` false (variant fields null) when the
    user is not in the test; ``reason`` says why (see gateway.assignment.decide)."""

    test_id: int
    test_name: str
    user_id: str
    assigned: bool
    variant_id: int | None
    variant_name: str | None
    variant_key: str | None
    phase: int
    reason: str | None = None
    assignment_version: str
