"""Per-variant estimates from sufficient statistics: means, sample (co)variances, the ratio linearisation.

Variances come from ``sum_x2 - sum_x**2 / n``, which cancels catastrophically when the spread is tiny next
to the values themselves; anything below ``REL_TOL`` of the raw second moment is rounding noise and is
treated as exactly zero (so a constant metric reads as zero variance, not as a random 1e-3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abstream.stats.models import MetricType, VariantMoments

REL_TOL = 1e-10


def clean_variance(value: float, scale: float) -> float:
    """``value`` clamped at 0, and 0 if it is within rounding noise of ``scale`` (a raw second moment).
    NaN and infinities (an overflow upstream) pass through, for the caller to report, not to hide as 0."""
    if not math.isfinite(value) or value > REL_TOL * abs(scale):
        return value
    return 0.0


def sample_cov(n: int, sum_a: float, sum_b: float, sum_ab: float) -> float:
    """Sample covariance (ddof=1) from sums; 0 for n < 2. Not clamped: covariances may be negative."""
    if n < 2:
        return 0.0
    return (sum_ab - sum_a * (sum_b / n)) / (n - 1)


def sample_var(n: int, sum_a: float, sum_a2: float) -> float:
    """Sample variance (ddof=1) from sums, numerically-zero clamped; 0 for n < 2."""
    if n < 2:
        return 0.0
    return clean_variance(sample_cov(n, sum_a, sum_a, sum_a2), sum_a2 / (n - 1))


@dataclass(frozen=True, slots=True)
class Arm:
    """One variant's point estimate and the per-user variance that drives its standard error.

    ``mean`` is the estimate being compared (the conversion rate, the mean of x, or R = mean_x / mean_y);
    ``unit_var`` is the variance of the per-user value whose average has that mean to first order, so
    ``se**2 = unit_var / n``: p(1-p) for a proportion (Wald), the sample variance for a mean, and the
    delta-method variance of the linearised value (x - R y) / mean_y for a ratio.
    """

    n: int
    mean: float | None
    unit_var: float
    std: float | None
    numerator_mean: float | None = None
    denominator_mean: float | None = None

    @property
    def se(self) -> float:
        return math.sqrt(self.unit_var / self.n) if self.n > 0 else 0.0


def summarize(metric_type: MetricType, v: VariantMoments) -> Arm:
    """The descriptive figures of one variant; never divides by zero."""
    n = v.n
    if n == 0:
        return Arm(n=0, mean=None, unit_var=0.0, std=None)
    mean_x = v.sum_x / n
    if metric_type == "proportion":
        p = v.users_with_metric / n
        std = math.sqrt(p * (1.0 - p) * n / (n - 1)) if n >= 2 else None
        return Arm(n=n, mean=p, unit_var=p * (1.0 - p), std=std)
    if metric_type == "mean":
        var_x = sample_var(n, v.sum_x, v.sum_x2)
        return Arm(n=n, mean=mean_x, unit_var=var_x, std=math.sqrt(var_x) if n >= 2 else None)
    # ratio: x is the numerator, y the denominator
    assert v.sum_y is not None and v.sum_y2 is not None and v.sum_xy is not None
    mean_y = v.sum_y / n
    if v.sum_y == 0:
        return Arm(n=n, mean=None, unit_var=0.0, std=None, numerator_mean=mean_x, denominator_mean=mean_y)
    r = v.sum_x / v.sum_y
    var_x = sample_var(n, v.sum_x, v.sum_x2)
    var_y = sample_var(n, v.sum_y, v.sum_y2)
    cov_xy = sample_cov(n, v.sum_x, v.sum_y, v.sum_xy)
    # Var(x - R y) / mean_y^2 (Deng, Knoblich & Lu 2018): the delta method for mean_x / mean_y, written as
    # ratios so that squares of large values never overflow.
    lin = var_x - 2.0 * r * cov_xy + r * r * var_y
    lin = clean_variance(lin, var_x + r * r * var_y)
    unit_var = (lin / mean_y) / mean_y
    return Arm(n=n, mean=r, unit_var=unit_var, std=None, numerator_mean=mean_x, denominator_mean=mean_y)
