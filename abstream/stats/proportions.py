"""Proportions from counts alone: the Wilson score interval of one rate, and one rate against another.

Used by the funnels of the metrics API, where a step's conversion is users at this step over users at an
earlier one. Wilson (1927) rather than Wald for a single rate: it stays inside [0, 1] and keeps its
coverage for small counts and rates near 0 or 1, where funnel steps often are (= statsmodels
``proportion_confint(method="wilson")``). The comparison is the two-proportion z of ``inference``.
"""

from __future__ import annotations

import math
from typing import Any

from abstream.stats import models as m
from abstream.stats.inference import two_proportions, z_quantile


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> dict[str, float] | None:
    """Wilson score interval of successes/trials; None without trials."""
    if trials <= 0 or successes < 0 or successes > trials:
        return None
    z = z_quantile(level)
    p = successes / trials
    z2n = z * z / trials
    center = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials)) / (1 + z2n)
    return m.interval(max(0.0, center - half), min(1.0, center + half))


def rate(successes: int, trials: int, level: float = 0.95) -> dict[str, Any]:
    """``{"rate", "ci"}`` (rate null without trials)."""
    return {
        "rate": successes / trials if trials > 0 else None,
        "ci": wilson_interval(successes, trials, level),
    }


def compare_rates(c0: int, n0: int, c1: int, n1: int, level: float = 0.95) -> dict[str, Any]:
    """c1/n1 against c0/n0: difference, Wald interval, pooled-z p-value; nulls with a ``reason`` when either
    rate has no trials or both rates are 0 or 1 (no variance to test against)."""
    out: dict[str, Any] = {"test": "two_proportion_z", "difference": None, "ci": None, "p_value": None, "reason": None}
    if n0 <= 0 or n1 <= 0:
        out["reason"] = m.reason(m.EMPTY_VARIANT, "a rate without users has nothing to compare")
        return out
    pooled = (c0 + c1) / (n0 + n1)
    if pooled in (0.0, 1.0):
        out["difference"] = c1 / n1 - c0 / n0
        out["reason"] = m.reason(m.ZERO_VARIANCE, "every user in both groups has the same outcome")
        return out
    est = two_proportions(c0, n0, c1, n1, level)
    out.update(
        difference=m.finite(est.diff), ci=m.interval(est.low, est.high), p_value=m.finite(est.p_value)
    )  # fmt: skip
    return out
