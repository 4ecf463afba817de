"""Two-sample inference kernels: fixed-horizon tests, the delta-method relative lift, the Gaussian-mixture
confidence sequence and the flat-prior normal posterior.

Each kernel is plain numpy/SciPy arithmetic that works on scalars and, elementwise, on arrays (the
simulation tests run thousands of experiments through the very same code). Callers check the guard rails
first (n >= 2, a positive standard error, a non-zero control mean); the kernels do not re-check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import special

Num = Any  # a float or a numpy array of floats (the kernels are elementwise)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A difference with its standard error, two-sided interval and p-value (plus the test's df, if a t-test)."""

    diff: Num
    se: Num
    low: Num
    high: Num
    p_value: Num
    df: Num = None


_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


@lru_cache(maxsize=64)
def _z_quantile(level: float) -> float:
    return float(special.ndtri(0.5 + level / 2.0))


def z_quantile(level: float) -> float:
    """The two-sided normal critical value, e.g. 1.95996 for level 0.95."""
    return _z_quantile(level)


def z_estimate(diff: Num, se: Num, level: float) -> Estimate:
    """Wald z interval and p-value for a difference with standard error ``se``."""
    q = z_quantile(level)
    p = 2.0 * special.ndtr(-np.abs(diff / se))
    return Estimate(diff=diff, se=se, low=diff - q * se, high=diff + q * se, p_value=p)


def welch(m0: Num, var0: Num, n0: Num, m1: Num, var1: Num, n1: Num, level: float) -> Estimate:
    """Welch's unequal-variance t-test of m1 - m0 (= scipy ``ttest_ind(equal_var=False)``), CI from the t
    distribution with Welch-Satterthwaite df (= statsmodels ``tconfint_diff(usevar="unequal")``).

    ``var`` are per-user sample variances (ddof=1). The df is written with the arms' shares of the total
    variance so that no variance is ever squared (no overflow for huge values).
    """
    se2_0 = var0 / n0
    se2_1 = var1 / n1
    total = se2_0 + se2_1
    share0 = se2_0 / total
    share1 = se2_1 / total
    df = 1.0 / (share0 * share0 / (n0 - 1) + share1 * share1 / (n1 - 1))
    se = np.sqrt(total)
    diff = m1 - m0
    q = special.stdtrit(df, 0.5 + level / 2.0)
    p = 2.0 * special.stdtr(df, -np.abs(diff / se))
    return Estimate(diff=diff, se=se, low=diff - q * se, high=diff + q * se, p_value=p, df=df)


def two_proportions(c0: Num, n0: Num, c1: Num, n1: Num, level: float) -> Estimate:
    """Two-proportion z-test: p-value with the pooled SE (= statsmodels ``proportions_ztest``), interval with
    the unpooled Wald SE (= ``confint_proportions_2indep(method="wald")``). ``se`` is the unpooled one.

    Pooling is exact under the null p0 == p1 that the p-value tests; the interval is about a non-zero
    difference, where the arms' own variances are the right ones.
    """
    p0 = c0 / n0
    p1 = c1 / n1
    diff = p1 - p0
    pooled = (c0 + c1) / (n0 + n1)
    se_pooled = np.sqrt(pooled * (1.0 - pooled) * (1.0 / n0 + 1.0 / n1))
    se = np.sqrt(p0 * (1.0 - p0) / n0 + p1 * (1.0 - p1) / n1)
    q = z_quantile(level)
    p = 2.0 * special.ndtr(-np.abs(diff / se_pooled))
    return Estimate(diff=diff, se=se, low=diff - q * se, high=diff + q * se, p_value=p)


def relative(m0: Num, se0: Num, m1: Num, se1: Num, multiplier: Num) -> Estimate:
    """Relative lift (m1 - m0) / m0 and its delta-method interval ``lift +- multiplier * se``, with
    Var = var(m1)/m0^2 + m1^2 var(m0)/m0^4 (arms independent). Written as ratios so nothing overflows.

    ``multiplier`` is the normal critical value for a fixed-horizon interval, or the sequential width
    multiplier for an always-valid one. ``p_value`` is left ``None``: the absolute test is the test.
    """
    ratio = m1 / m0
    lift = ratio - 1.0
    scale = np.abs(m0)
    se = np.hypot(se1 / scale, ratio * (se0 / scale))
    return Estimate(diff=lift, se=se, low=lift - multiplier * se, high=lift + multiplier * se, p_value=None)


def mixture_rho(alpha: float, tuning: float) -> float:
    """Mixing scale rho of the Gaussian-mixture confidence sequence, chosen so its width is smallest when the
    pair has ``tuning`` (n*) users: rho^2 = (-2 ln a + ln(1 - 2 ln a)) / n* (Waudby-Smith et al., as
    GrowthBook's ``sequential_tuning_parameter``)."""
    log_a = np.log(alpha)
    return float(np.sqrt((-2.0 * log_a + np.log(1.0 - 2.0 * log_a)) / tuning))


def sequential_multiplier(n_total: Num, alpha: float, tuning: float) -> Num:
    """Half-width / SE of the two-sided Gaussian-mixture asymptotic CS after ``n_total`` users:
    sqrt( 2 (N rho^2 + 1) / (N rho^2) * ln( sqrt(N rho^2 + 1) / alpha ) ).

    That is the CS  est +- s_hat * sqrt(2 (N rho^2 + 1) / (N^2 rho^2) * ln(sqrt(N rho^2 + 1) / alpha))
    with s_hat^2 = N * se^2 the per-user variance (Waudby-Smith et al. 2024 eq. (9) of arXiv v7).
    """
    rho2 = mixture_rho(alpha, tuning) ** 2
    a = n_total * rho2 + 1.0
    return np.sqrt(2.0 * a / (n_total * rho2) * (0.5 * np.log(a) - np.log(alpha)))


def sequential_p_value(diff: Num, se: Num, n_total: Num, alpha: float, tuning: float) -> Num:
    """Always-valid p-value: 1 / (the mixture martingale), capped at 1, with the same rho as the CS, so
    p < alpha exactly when the CS excludes 0. Computed in logs: the e-value can overflow, its log cannot.

    log E = rho^2 N z^2 / (2 (N rho^2 + 1)) - ln(N rho^2 + 1) / 2, with z = diff / se.
    """
    rho2 = mixture_rho(alpha, tuning) ** 2
    a = n_total * rho2 + 1.0
    z = diff / se
    log_e = rho2 * n_total * z * z / (2.0 * a) - 0.5 * np.log(a)
    return np.exp(-np.maximum(log_e, 0.0))


def flat_prior_posterior(diff: Num, se: Num) -> tuple[Num, Num]:
    """(P(delta > 0), E[max(0, -delta)]) for the posterior delta ~ N(diff, se^2) under a flat prior.

    The expected loss of shipping the treatment is se * phi(d/se) - d * Phi(-d/se) (the normal partial
    expectation); it is clamped at 0 because the two terms cancel to rounding noise when d >> se.
    """
    z = diff / se
    chance = special.ndtr(z)
    loss = se * np.exp(-0.5 * z * z) / _SQRT_2PI - diff * special.ndtr(-z)
    return chance, np.maximum(loss, 0.0)
