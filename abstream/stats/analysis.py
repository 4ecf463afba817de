"""``analyze_metric``: one metric's per-variant figures and each treatment's comparison with the control.

The output is plain JSON-ready data with a fixed shape: every key is always present, every number is a
finite float (or null with a reason), so the HTTP API and the CLI can serialise it as is
(``json.dumps(..., allow_nan=False)`` never fails).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from abstream.stats import cuped
from abstream.stats import models as m
from abstream.stats.inference import (
    Estimate,
    flat_prior_posterior,
    relative,
    sequential_multiplier,
    sequential_p_value,
    two_proportions,
    welch,
    z_estimate,
    z_quantile,
)
from abstream.stats.moments import Arm, summarize

TESTS = {"proportion": "two_proportion_z", "mean": "welch_t", "ratio": "delta_method_z"}
CUPED_TESTS = {"proportion": "wald_z", "mean": "welch_t"}
SEQUENTIAL_METHOD = "gaussian_mixture_confidence_sequence"
FLAT_PRIOR = "flat (improper) prior on the absolute difference; posterior N(difference, se^2)"


def analyze_metric(
    metric_type: m.MetricType,
    variants: Sequence[m.VariantMoments],
    control_key: str,
    options: m.AnalysisOptions = m.DEFAULT_OPTIONS,
) -> list[dict[str, Any]]:
    """One dict per variant, in input order (the control included). Raises ``ValueError`` only for input that
    breaks the contract (unknown metric type or control, negative counts, non-finite sums, ...); thin or
    degenerate data yields null figures with a ``reason`` instead."""
    _validate(metric_type, variants, control_key, options)
    arms = [summarize(metric_type, v) for v in variants]
    cuped_fit = cuped.fit(metric_type, variants)
    ci = next(i for i, v in enumerate(variants) if v.key == control_key)
    out = []
    for v, arm in zip(variants, arms, strict=True):
        is_control = v.key == control_key
        entry = _describe(metric_type, v, arm, is_control)
        if not is_control:
            entry["vs_control"] = _compare(metric_type, variants[ci], arms[ci], v, arm, cuped_fit, options)
        out.append(entry)
    return out


def _describe(metric_type: m.MetricType, v: m.VariantMoments, arm: Arm, is_control: bool) -> dict[str, Any]:
    return {
        "variant_key": v.key,
        "is_control": is_control,
        "exposed_users": int(v.n),
        "users_with_metric": int(v.users_with_metric),
        "mean": m.finite(arm.mean),
        "std": m.finite(arm.std),
        "conversion_rate": m.finite(arm.mean) if metric_type == "proportion" else None,
        "numerator_mean": m.finite(arm.numerator_mean),
        "denominator_mean": m.finite(arm.denominator_mean),
        "vs_control": None,
    }


def _guard(
    metric_type: m.MetricType,
    c_v: m.VariantMoments,
    c: Arm,
    t_v: m.VariantMoments,
    t: Arm,
    options: m.AnalysisOptions,
) -> m.Reason | None:
    """The first guard rail that applies to this comparison, or None."""
    if c.n == 0:
        return m.reason(m.EMPTY_CONTROL, f"The control {c_v.key!r} has no exposed users.")
    if t.n == 0:
        return m.reason(m.EMPTY_VARIANT, f"The variant {t_v.key!r} has no exposed users.")
    need = max(options.min_exposed, 2)
    if c.n < need or t.n < need:
        return m.reason(
            m.BELOW_MIN_EXPOSED,
            f"Needs at least {need} exposed users per variant (control {c.n}, variant {t.n}).",
        )
    if min(c_v.users_with_metric, t_v.users_with_metric) < options.min_conversions:
        what = "converters" if metric_type == "proportion" else "users with a non-zero value"
        return m.reason(
            m.BELOW_MIN_CONVERSIONS,
            f"Needs at least {options.min_conversions} {what} per variant "
            f"(control {c_v.users_with_metric}, variant {t_v.users_with_metric}).",
        )
    if metric_type == "ratio" and (c.mean is None or t.mean is None):
        return m.reason(m.ZERO_DENOMINATOR, "The ratio's denominator sums to 0 in the control or the variant.")
    if c.unit_var == 0.0 and t.unit_var == 0.0:
        return m.reason(m.ZERO_VARIANCE, "The metric has zero variance in both the control and the variant.")
    return None


def _fixed(
    metric_type: m.MetricType, c_v: m.VariantMoments, c: Arm, t_v: m.VariantMoments, t: Arm, level: float
) -> Estimate:
    """The fixed-horizon test of the metric type (section 2 of docs/statistics.md)."""
    assert c.mean is not None and t.mean is not None
    if metric_type == "proportion":
        return two_proportions(c_v.users_with_metric, c.n, t_v.users_with_metric, t.n, level)
    if metric_type == "mean":
        return welch(c.mean, c.unit_var, c.n, t.mean, t.unit_var, t.n, level)
    return z_estimate(t.mean - c.mean, math.sqrt(c.se**2 + t.se**2), level)


def _ci(e: Estimate | None) -> dict[str, float] | None:
    return None if e is None else m.interval(e.low, e.high)


def _compare(
    metric_type: m.MetricType,
    c_v: m.VariantMoments,
    c: Arm,
    t_v: m.VariantMoments,
    t: Arm,
    cuped_fit: cuped.CupedFit | m.Reason,
    options: m.AnalysisOptions,
) -> dict[str, Any]:
    level = options.level
    relative_reason = None
    if c.mean == 0.0:
        relative_reason = m.reason(m.ZERO_CONTROL_MEAN, "The control mean is 0: a relative lift is undefined.")
    # The point lifts are descriptive (differences of the arms' means): they stay even when a guard rail nulls
    # the inferential figures.
    abs_lift = rel_lift = None
    if c.mean is not None and t.mean is not None:
        abs_lift = m.finite(t.mean - c.mean)
        if relative_reason is None:
            rel_lift = m.finite(t.mean / c.mean - 1.0)
    out: dict[str, Any] = {
        "test": TESTS[metric_type],
        "level": float(level),
        "absolute_lift": abs_lift,
        "absolute_ci": None,
        "relative_lift": rel_lift,
        "relative_ci": None,
        "p_value": None,
        "significant": None,
        "reason": _guard(metric_type, c_v, c, t_v, t, options),
        "relative_reason": relative_reason,
        "cuped": None,
        "sequential": None,
        "bayesian": None,
    }
    if out["reason"] is not None:
        return out

    with np.errstate(all="ignore"):
        est = _fixed(metric_type, c_v, c, t_v, t, level)
        rel = None
        if relative_reason is None:
            rel = relative(c.mean, c.se, t.mean, t.se, z_quantile(level))
        chance, loss = flat_prior_posterior(est.diff, est.se)
        inferential = {
            "absolute_lift": m.finite(est.diff),
            "absolute_ci": _ci(est),
            "relative_ci": _ci(rel),
            "p_value": m.finite(est.p_value),
        }
        bayesian = {
            "chance_to_beat_control": m.finite(chance),
            "expected_loss": m.finite(loss),
            "prior": FLAT_PRIOR,
        }
        numbers_ok = (
            inferential["absolute_lift"] is not None
            and inferential["absolute_ci"] is not None
            and inferential["p_value"] is not None
            and (rel is None or inferential["relative_ci"] is not None)
            and bayesian["chance_to_beat_control"] is not None
            and bayesian["expected_loss"] is not None
        )
        sequential = _sequential(est, rel, c.n + t.n, options) if options.sequential else None
        if sequential is not None:
            numbers_ok = numbers_ok and sequential["absolute_ci"] is not None and sequential["p_value"] is not None
            numbers_ok = numbers_ok and (rel is None or sequential["relative_ci"] is not None)
        if not numbers_ok:
            out["reason"] = m.reason(m.NUMERICAL_ERROR, "The figures overflowed floating point; check the inputs.")
            return out
        cuped_block = _cuped(metric_type, cuped_fit, c_v, t_v, relative_reason is None, level)
    p_value = inferential["p_value"]
    out.update(inferential)
    out["significant"] = bool(p_value < options.alpha)
    out["bayesian"] = bayesian
    out["sequential"] = sequential
    out["cuped"] = cuped_block
    return out


def _sequential(est: Estimate, rel: Estimate | None, n_total: int, options: m.AnalysisOptions) -> dict[str, Any]:
    """Always-valid CI and p-value for the absolute difference; the relative CI uses the same multiplier."""
    alpha, tuning = options.alpha, options.sequential_tuning
    mult = sequential_multiplier(n_total, alpha, tuning)
    half = mult * est.se
    block: dict[str, Any] = {
        "method": SEQUENTIAL_METHOD,
        "tuning": float(tuning),
        "absolute_ci": m.interval(est.diff - half, est.diff + half),
        "relative_ci": None,
        "p_value": m.finite(sequential_p_value(est.diff, est.se, n_total, alpha, tuning)),
    }
    if rel is not None:
        block["relative_ci"] = m.interval(rel.diff - mult * rel.se, rel.diff + mult * rel.se)
    return block


def _cuped_null(code_reason: m.Reason) -> dict[str, Any]:
    return {
        "test": None,
        "theta": None,
        "variance_reduction": None,
        "absolute_lift": None,
        "absolute_ci": None,
        "relative_lift": None,
        "relative_ci": None,
        "p_value": None,
        "reason": code_reason,
    }


def _cuped(
    metric_type: m.MetricType,
    f: cuped.CupedFit | m.Reason,
    c_v: m.VariantMoments,
    t_v: m.VariantMoments,
    want_relative: bool,
    level: float,
) -> dict[str, Any]:
    if not isinstance(f, cuped.CupedFit):
        return _cuped_null(f)
    a0, a1 = cuped.adjust(c_v, f), cuped.adjust(t_v, f)
    if a0.var == 0.0 and a1.var == 0.0:
        return _cuped_null(
            m.reason(m.ZERO_ADJUSTED_VARIANCE, "The adjusted metric has zero variance in both arms (x is linear in y).")
        )
    if metric_type == "mean":
        est = welch(a0.mean, a0.var, a0.n, a1.mean, a1.var, a1.n, level)
    else:
        est = z_estimate(a1.mean - a0.mean, math.sqrt(a0.var / a0.n + a1.var / a1.n), level)
    rel = None
    if want_relative and a0.mean != 0.0:
        rel = relative(a0.mean, math.sqrt(a0.var / a0.n), a1.mean, math.sqrt(a1.var / a1.n), z_quantile(level))
    block = {
        "test": CUPED_TESTS[metric_type],
        "theta": m.finite(f.theta),
        "variance_reduction": m.finite(f.variance_reduction),
        "absolute_lift": m.finite(est.diff),
        "absolute_ci": _ci(est),
        "relative_lift": None if rel is None else m.finite(rel.diff),
        "relative_ci": _ci(rel),
        "p_value": m.finite(est.p_value),
        "reason": None,
    }
    required = ("theta", "variance_reduction", "absolute_lift", "absolute_ci", "p_value")
    if any(block[k] is None for k in required) or (rel is not None and block["relative_ci"] is None):
        return _cuped_null(m.reason(m.NUMERICAL_ERROR, "The CUPED figures overflowed floating point."))
    return block


def _validate(
    metric_type: str, variants: Sequence[m.VariantMoments], control_key: str, options: m.AnalysisOptions
) -> None:
    if metric_type not in m.METRIC_TYPES:
        raise ValueError(f"metric_type must be one of {m.METRIC_TYPES}, not {metric_type!r}")
    if not variants:
        raise ValueError("no variants")
    keys = [v.key for v in variants]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate variant keys: {keys}")
    if control_key not in keys:
        raise ValueError(f"control {control_key!r} is not one of the variants {keys}")
    if not (0.0 < options.level < 1.0):
        raise ValueError(f"level must be in (0, 1), not {options.level}")
    if not (math.isfinite(options.sequential_tuning) and options.sequential_tuning > 0):
        raise ValueError(f"sequential_tuning must be a positive number, not {options.sequential_tuning}")
    if options.min_exposed < 0 or options.min_conversions < 0:
        raise ValueError("min_exposed and min_conversions must be >= 0")
    for v in variants:
        for count in (v.n, v.users_with_metric):
            if isinstance(count, bool) or not isinstance(count, numbers.Integral):
                raise ValueError(f"{v.key}: n and users_with_metric must be integers, not {count!r}")
        if v.n < 0:
            raise ValueError(f"{v.key}: n must be >= 0, not {v.n}")
        if not (0 <= v.users_with_metric <= v.n):
            raise ValueError(f"{v.key}: users_with_metric must be in [0, n], not {v.users_with_metric}")
        sums = [v.sum_x, v.sum_x2, *(s for s in (v.sum_y, v.sum_y2, v.sum_xy) if s is not None)]
        if not all(math.isfinite(s) for s in sums):
            raise ValueError(f"{v.key}: the sums must be finite numbers")
        if v.sum_x2 < 0 or (v.sum_y2 is not None and v.sum_y2 < 0):
            raise ValueError(f"{v.key}: a sum of squares is negative")
        if metric_type == "proportion" and not (v.sum_x == v.sum_x2 == v.users_with_metric):
            raise ValueError(f"{v.key}: a proportion needs 0/1 values (sum_x == sum_x2 == users_with_metric)")
        if metric_type == "ratio" and not v.has_y:
            raise ValueError(f"{v.key}: a ratio metric needs the denominator sums (sum_y, sum_y2, sum_xy)")
