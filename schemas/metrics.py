"""The Calicritters metrics API (/v1/metrics/*): query parameters and answers, for validation and /openapi.json.

Query parameters are validated here (unknown ones too: a typo such as ``?form=`` must not silently widen a
query), and a refusal names the parameter: 400 ``invalid_parameter`` with ``details[].field``.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from schemas.names import EVENT_NAME_PATTERN, KEY_PATTERN
from schemas.results import ExperimentResults, Interval, Reason

MAX_DAILY_SPAN_DAYS = 92
"""Longest /v1/metrics/daily range (inclusive), about a quarter."""

DEFAULT_DAILY_SPAN_DAYS = 30

ExperimentRef = Field(
    default=None, max_length=64, pattern=r"^(?:[0-9]{1,10}|[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})$",
    description="An experiment id or key.",
)  # fmt: skip


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class DailyQuery(_Query):
    from_: date | None = Field(default=None, alias="from", description="First day (UTC, inclusive); default to-29")
    to: date | None = Field(default=None, description="Last day (UTC, inclusive); default today")
    event_name: str | None = Field(default=None, pattern=EVENT_NAME_PATTERN)
    platform: Literal["ios", "android", "unknown"] | None = Field(
        default=None, description="unknown: events sent without a platform"
    )
    app_version: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _range(self) -> DailyQuery:
        if self.from_ is not None and self.to is not None:
            if self.from_ > self.to:
                raise PydanticCustomError("invalid_range", "from is after to")
            if (self.to - self.from_).days + 1 > MAX_DAILY_SPAN_DAYS:
                raise PydanticCustomError(
                    "range_too_long", "at most {limit} days from `from` to `to`", {"limit": MAX_DAILY_SPAN_DAYS}
                )
        return self


class ExperimentsQuery(_Query):
    experiment: str | None = ExperimentRef
    level: str | None = Field(default=None, description="Confidence level: 0.90, 0.95 (default) or 0.99")


class FunnelsQuery(_Query):
    funnel: str | None = Field(default=None, pattern=KEY_PATTERN, description="A funnel key of tests.json")
    experiment: str | None = ExperimentRef


# ---- answers ------------------------------------------------------------------------------------------------


class Windowed(BaseModel):
    today: int
    last_7_days: int
    last_30_days: int


class RunningExperiment(BaseModel):
    experiment_id: int
    key: str
    name: str
    exposed_users: int
    variants: dict[str, int] = Field(description="variant key -> exposed users (current phase)")


class Summary(BaseModel):
    """GET /v1/metrics/summary: aggregates only, never a user id. Days are UTC."""

    generated_at: str
    events: Windowed = Field(description="Events stored (accepted, duplicates not counted), by event day")
    active_users: Windowed = Field(description="Distinct users with at least one event in the window")
    rejected_events: Windowed = Field(description="Events refused one by one (per-event validation)")
    refused_requests: Windowed = Field(description="Requests refused as a whole (malformed body, ...)")
    running_experiments: list[RunningExperiment]
    latest_event_time: str | None
    rollups_updated_at: str | None


class DailyRow(BaseModel):
    day: date
    event_name: str
    platform: str = Field(description="ios, android, or '' (not sent)")
    app_version: str = Field(description="'' when not sent")
    events: int
    unique_users: int


class DailyTotal(BaseModel):
    day: date
    event_name: str
    events: int
    unique_users: int = Field(description="Over all platforms and versions (not the sum of the rows)")


class Daily(BaseModel):
    from_: date = Field(alias="from")
    to: date
    rows: list[DailyRow]
    totals: list[DailyTotal] | None = Field(
        description="Per day and event over all platforms and versions; null when platform/app_version filter"
    )


class ExposureDay(BaseModel):
    day: date
    users: int


class VariantExposures(BaseModel):
    variant_id: int
    variant_key: str
    to_date: int = Field(description="Exposed users of the current phase")
    by_day: list[ExposureDay] = Field(description="Users first assigned per UTC day")


class ExperimentMetrics(BaseModel):
    experiment_id: int
    key: str
    name: str
    status: str
    exposures: list[VariantExposures]
    results: ExperimentResults


class Experiments(BaseModel):
    experiments: list[ExperimentMetrics]


class Rate(BaseModel):
    rate: float | None
    ci: Interval | None = Field(description="Wilson 95% interval")


class RateComparison(BaseModel):
    test: str
    difference: float | None
    ci: Interval | None
    p_value: float | None
    reason: Reason | None


class FunnelStep(BaseModel):
    step: int
    name: str
    users: int
    from_previous: Rate
    from_first: Rate
    vs_control: RateComparison | None = Field(
        default=None, description="from_first against the control's (variants only)"
    )


class FunnelVariant(BaseModel):
    variant_id: int
    variant_key: str
    is_control: bool
    steps: list[FunnelStep]


class FunnelExperiment(BaseModel):
    experiment_id: int
    key: str
    variants: list[FunnelVariant]


class FunnelOut(BaseModel):
    key: str
    name: str
    steps: list[str]
    conversion_window_seconds: int
    overall: list[FunnelStep] = Field(description="All users, all their events")
    experiments: list[FunnelExperiment] = Field(
        description="Per variant (events from the exposure on), for the `experiment` asked or the funnel's "
        "experiment_keys"
    )


class Funnels(BaseModel):
    funnels: list[FunnelOut]


__all__ = [
    "MAX_DAILY_SPAN_DAYS", "DailyQuery", "ExperimentsQuery", "FunnelsQuery", "Summary", "Daily", "Experiments",
    "Funnels",
]  # fmt: skip
