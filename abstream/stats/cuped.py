"""CUPED regression adjustment (Deng, Xu, Kohavi & Walker 2013) from sufficient statistics.

Every variant's x is replaced by x - theta (y - y_bar), with ONE theta for the whole experiment: the slope of
x on y from the within-variant-centred covariance pooled over all variants,

    theta = sum_g S_xy,g / sum_g S_yy,g,   S_ab,g = sum_ab,g - sum_a,g sum_b,g / n_g,

which is the OLS coefficient of y in ``x ~ variant dummies + y``. Centring within variants keeps the
treatment effect (a shift of x in one arm) out of the covariance. y_bar (the pooled mean of y) only moves
every arm's level by the same amount, so it leaves the differences untouched and keeps adjusted means on
the scale of x. theta and y_bar are treated as constants in the standard errors: their estimation error is
O(1/n), as in Deng et al.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from abstream.stats import models as m
from abstream.stats.moments import clean_variance, sample_cov, sample_var


@dataclass(frozen=True, slots=True)
class CupedFit:
    """theta, the pooled variance reduction 1 - S_resid/S_xx (= the within-variant rho^2), and y_bar."""

    theta: float
    variance_reduction: float
    y_mean: float


@dataclass(frozen=True, slots=True)
class AdjustedArm:
    """One variant's CUPED-adjusted mean and per-user sample variance (ddof=1) of x - theta (y - y_bar)."""

    n: int
    mean: float
    var: float


def fit(metric_type: m.MetricType, variants: Sequence[m.VariantMoments]) -> CupedFit | m.Reason:
    """The experiment-wide theta, or the reason why CUPED is not available."""
    if metric_type == "ratio":
        return m.reason(m.CUPED_NOT_FOR_RATIO, "CUPED is not available for ratio metrics (y is the denominator there).")
    if not all(v.has_y for v in variants):
        return m.reason(m.NO_COVARIATE, "No pre-exposure covariate (sum_y, sum_y2, sum_xy) for every variant.")
    s_xx = s_yy = s_xy = raw_yy = 0.0
    n_total = 0
    sum_y_total = 0.0
    for v in variants:
        if v.n == 0:
            continue
        assert v.sum_y is not None and v.sum_y2 is not None and v.sum_xy is not None
        s_xx += v.sum_x2 - v.sum_x * (v.sum_x / v.n)
        s_yy += v.sum_y2 - v.sum_y * (v.sum_y / v.n)
        s_xy += v.sum_xy - v.sum_x * (v.sum_y / v.n)
        raw_yy += v.sum_y2
        n_total += v.n
        sum_y_total += v.sum_y
    s_yy = clean_variance(s_yy, raw_yy)
    if s_yy == 0.0:
        return m.reason(
            m.ZERO_COVARIATE_VARIANCE, "The pre-exposure covariate does not vary within variants: nothing to adjust."
        )
    theta = s_xy / s_yy
    reduction = theta * (s_xy / s_xx) if s_xx > 0 else 0.0
    return CupedFit(theta=theta, variance_reduction=min(max(reduction, 0.0), 1.0), y_mean=sum_y_total / n_total)


def adjust(v: m.VariantMoments, f: CupedFit) -> AdjustedArm:
    """Mean and variance of the adjusted values of one variant (n >= 2; the caller checks it)."""
    assert v.sum_y is not None and v.sum_y2 is not None and v.sum_xy is not None
    n = v.n
    theta = f.theta
    var_x = sample_var(n, v.sum_x, v.sum_x2)
    var_y = sample_var(n, v.sum_y, v.sum_y2)
    cov = sample_cov(n, v.sum_x, v.sum_y, v.sum_xy)
    var = clean_variance(var_x + theta * theta * var_y - 2.0 * theta * cov, var_x + theta * theta * var_y)
    mean = v.sum_x / n - theta * (v.sum_y / n - f.y_mean)
    return AdjustedArm(n=n, mean=mean, var=var)
