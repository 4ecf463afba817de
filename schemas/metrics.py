"""The Calicritters metrics API (/v1/metrics/*): query parameters and answers, for validation and /openapi.json.

Query parameters are validated here (unknown ones too: a typo such as ``?form=`` must not silently widen a
query), and a refusal names the parameter: 400 ``invalid_parameter`` with ``details[].field``.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


DAY_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(2149, 6, 6)
"""The days a rollup can hold (ClickHouse Date)."""


def parse_day(value: str | None, name: str) -> date | None:
    """A YYYY-MM-DD query value as a date within FIRST_DAY..LAST_DAY; ValueError with a message otherwise."""
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} is not a calendar day (YYYY-MM-DD)") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ValueError(f"{name} must lie between {FIRST_DAY} and {LAST_DAY}")
    return day


class DailyQuery(_Query):
    """The range is checked once defaults are applied (gateway.metrics.daily): at most MAX_DAILY_SPAN_DAYS."""

    from_: str | None = Field(default=None, alias="from", pattern=DAY_PATTERN,
                              description="First UTC day, inclusive (YYYY-MM-DD); default to - 29")  # fmt: skip
    to: str | None = Field(default=None, pattern=DAY_PATTERN, description="Last UTC day, inclusive; default today")
    event_name: str | None = Field(default=None, pattern=EVENT_NAME_PATTERN)
    platform: Literal["ios", "android", "unknown"] | None = Field(
        default=None, description="unknown: events sent without a platform"
    )
    app_version: str | None = Field(default=None, min_length=1, max_length=64)


class ResultsQuery(_Query):
    level: Literal["0.9", "0.90", "0.95", "0.99", "90", "95", "99"] | None = Field(
        default=None, description="Confidence level (default 0.95)"
    )
    metric: str | None = Field(default=None, min_length=1, max_length=200, description="Only this metric (its key)")


class ExperimentsQuery(_Query):
    experiment: str | None = ExperimentRef
    level: Literal["0.9", "0.90", "0.95", "0.99", "90", "95", "99"] | None = Field(
        default=None, description="Confidence level (default 0.95)"
    )


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
    by_day: list[ExposureDay] = Field(
        description="Exposed users of the current phase per UTC day of their exposure (they add up to to_date)"
    )


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
