"""The results body (GET /apiv1/ab-tests/{id}/results, `abstream results --json`), for /openapi.json.

gateway/results.py builds it from the rollups and abstream.stats; docs/statistics.md says which formula
gives each number. A number that cannot be given is ``null`` with a ``reason`` ``{code, message}``
beside it, never NaN or Infinity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Interval(BaseModel):
    low: float
    high: float


class Reason(BaseModel):
    code: str = Field(description="Machine-readable: below_min_exposed, zero_variance, ... (docs/statistics.md)")
    message: str


class CupedComparison(BaseModel):
    test: str | None = None
    theta: float | None = None
    variance_reduction: float | None = Field(default=None, description="1 - adjusted/unadjusted variance (≈ rho²)")
    absolute_lift: float | None = None
    absolute_ci: Interval | None = None
    relative_lift: float | None = None
    relative_ci: Interval | None = None
    p_value: float | None = None
    reason: Reason | None = None


class SequentialComparison(BaseModel):
    method: str = Field(description="gaussian_mixture_confidence_sequence")
    tuning: float = Field(description="The mixture's tuning parameter n* (docs/statistics.md)")
    absolute_ci: Interval | None
    relative_ci: Interval | None
    p_value: float | None = Field(description="Always-valid p-value: safe to read at every peek")


class BayesianComparison(BaseModel):
    chance_to_beat_control: float | None
    expected_loss: float | None
    prior: str


class Comparison(BaseModel):
    """A variant against the control."""

    test: str | None = Field(default=None, description="two_proportion_z, welch_t or delta_method_z")
    level: float | None = None
    absolute_lift: float | None = None
    absolute_ci: Interval | None = None
    relative_lift: float | None = None
    relative_ci: Interval | None = Field(default=None, description="Delta method")
    p_value: float | None = None
    p_value_holm: float | None = Field(default=None, description="Holm-adjusted across every variant and metric")
    significant: bool | None = None
    reason: Reason | None = Field(default=None, description="Set when a guard rail nulls the inferential figures")
    relative_reason: Reason | None = None
    cuped: CupedComparison | None = None
    sequential: SequentialComparison | None = Field(default=None, description="Only with sequential_testing")
    bayesian: BayesianComparison | None = None


class MetricVariant(BaseModel):
    variant_id: int
    variant_key: str
    is_control: bool
    exposed_users: int
    users_with_metric: int
    mean: float | None = Field(description="Per exposed user; for a ratio: Σ numerator / Σ denominator")
    std: float | None
    conversion_rate: float | None
    numerator_mean: float | None
    denominator_mean: float | None
    vs_control: Comparison | None


class MetricSource(BaseModel):
    kind: Literal["event", "tracked"]
    name: str


class MetricResults(BaseModel):
    key: str
    name: str
    type: Literal["proportion", "count", "sum", "ratio"]
    source: MetricSource | None
    numerator: str | None
    denominator: str | None
    variants: list[MetricVariant]


class Srm(BaseModel):
    p_value: float | None
    chi2: float | None
    df: int | None
    flagged: bool = Field(description="p < threshold: exposed users do not match the configured weights")
    threshold: float
    expected: list[float]
    observed: list[int]
    reason: Reason | None = None


class Exposure(BaseModel):
    rule: Literal["first_assignment", "exposure_event"]
    event: str | None
    description: str


class Freshness(BaseModel):
    latest_event_time: str | None = Field(description="The latest event time the rollups include (UTC)")
    rollups_updated_at: str | None
    age_seconds: float | None


class VariantSummary(BaseModel):
    variant_id: int
    variant_key: str
    variant_name: str
    is_control: bool
    weight: float = Field(description="Normalised configured share")
    exposed_users: int


class MultipleTesting(BaseModel):
    method: Literal["holm"]
    comparisons: int


class ExperimentResults(BaseModel):
    """An experiment's results (its current phase) from the cumulative rollups."""

    test_id: int
    test_key: str
    test_name: str
    status: str
    phase: int
    control_variant_id: int
    control_variant_key: str
    total_exposed_users: int
    exposure: Exposure
    level: float
    sequential_testing: bool
    cuped_lookback_days: int
    multiple_testing: MultipleTesting
    srm: Srm
    data_freshness: Freshness
    variants: list[VariantSummary]
    metrics: list[MetricResults]
    query_ms: float = Field(description="Time spent reading the rollups and computing, in the gateway")
