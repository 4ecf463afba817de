"""The engine's inputs (sufficient statistics from the streaming rollups, never per-user rows) and its
reason codes.

Everything downstream works on these sums only, so the same figures can be computed from a ClickHouse
rollup, a Kafka aggregate or a test's numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

MetricType = Literal["proportion", "mean", "ratio"]
METRIC_TYPES: tuple[str, ...] = ("proportion", "mean", "ratio")


@dataclass(frozen=True, slots=True)
class VariantMoments:
    """Sufficient statistics of one variant for one metric.

    ``x`` is the user's metric value since exposure (0/1 for a proportion; the numerator for a ratio).
    ``y`` is the CUPED covariate (the same metric before exposure) for proportion/mean metrics, and the
    user's denominator for ratio metrics; ``None`` when not available.
    """

    key: str
    n: int
    users_with_metric: int
    sum_x: float
    sum_x2: float
    sum_y: float | None = None
    sum_y2: float | None = None
    sum_xy: float | None = None

    @property
    def has_y(self) -> bool:
        """All three y sums are present (one missing sum makes the covariate unusable)."""
        return self.sum_y is not None and self.sum_y2 is not None and self.sum_xy is not None


@dataclass(frozen=True, slots=True)
class AnalysisOptions:
    """How a metric is analysed. The API accepts only levels 0.90/0.95/0.99; the engine takes any 0 < level < 1."""

    level: float = 0.95
    sequential: bool = False
    sequential_tuning: float = 5000
    min_exposed: int = 50
    min_conversions: int = 5

    @property
    def alpha(self) -> float:
        return 1.0 - self.level


DEFAULT_OPTIONS = AnalysisOptions()

# Reason codes: why a number is null. Stable strings, part of the API contract (docs/statistics.md).
EMPTY_CONTROL = "empty_control"
EMPTY_VARIANT = "empty_variant"
BELOW_MIN_EXPOSED = "below_min_exposed"
BELOW_MIN_CONVERSIONS = "below_min_conversions"
ZERO_DENOMINATOR = "zero_denominator"
ZERO_VARIANCE = "zero_variance"
NUMERICAL_ERROR = "numerical_error"
ZERO_CONTROL_MEAN = "zero_control_mean"
CUPED_NOT_FOR_RATIO = "cuped_not_available_for_ratio"
NO_COVARIATE = "no_covariate"
ZERO_COVARIATE_VARIANCE = "zero_covariate_variance"
ZERO_ADJUSTED_VARIANCE = "zero_adjusted_variance"
SRM_NO_USERS = "no_users"
SRM_SINGLE_VARIANT = "single_variant"
SRM_TRAFFIC_IN_ZERO_WEIGHT = "traffic_in_zero_weight_variant"

Reason = dict[str, str]


def reason(code: str, message: str) -> Reason:
    """The one shape of every reason: ``{"code": ..., "message": ...}``."""
    return {"code": code, "message": message}


def finite(value: Any) -> float | None:
    """``value`` as a Python float, or ``None`` if it is missing, NaN or infinite: the output never carries
    NaN/Infinity (they are not JSON)."""
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def interval(low: Any, high: Any) -> dict[str, float] | None:
    """``{"low", "high"}`` or ``None`` when either end is not a finite number."""
    lo, hi = finite(low), finite(high)
    if lo is None or hi is None:
        return None
    return {"low": lo, "high": hi}
