"""Guard rails: thin, empty, degenerate and extreme data give reasons and nulls, never NaN, Infinity or an
exception."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from abstream.stats import AnalysisOptions, VariantMoments, analyze_metric
from tests.test_stats import close, moments

SEQ = AnalysisOptions(sequential=True)
INFERENTIAL = ("absolute_ci", "relative_ci", "p_value", "significant", "cuped", "sequential", "bayesian")


def strict_json(result: Any) -> None:
    json.dumps(result, allow_nan=False)


def walk_numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in walk_numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in walk_numbers(value)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    assert type(obj) in (int, float), f"not a plain number: {obj!r} ({type(obj)})"
    return [obj]


def check(result: list[dict]) -> None:
    """Strict JSON, plain Python numbers only, and a reason whenever inferential figures are missing."""
    strict_json(result)
    assert all(math.isfinite(v) for v in walk_numbers(result))
    for entry in result:
        vs = entry["vs_control"]
        if vs is None:
            continue
        if vs["reason"] is not None:
            assert set(vs["reason"]) == {"code", "message"} and vs["reason"]["code"]
            assert all(vs[k] is None for k in INFERENTIAL), vs
        else:
            assert vs["p_value"] is not None and vs["absolute_ci"] is not None
            assert isinstance(vs["significant"], bool)
            assert (vs["relative_ci"] is None) is (vs["relative_reason"] is not None)
            cu = vs["cuped"]
            assert (cu["p_value"] is None) is (cu["reason"] is not None)


def vs(metric: str, variants: list[VariantMoments], options: AnalysisOptions = SEQ) -> dict:
    result = analyze_metric(metric, variants, variants[0].key, options)
    check(result)
    return result[1]["vs_control"]


def empty(key: str) -> VariantMoments:
    return VariantMoments(key, n=0, users_with_metric=0, sum_x=0.0, sum_x2=0.0, sum_y=0.0, sum_y2=0.0, sum_xy=0.0)


@pytest.mark.parametrize("metric", ["proportion", "mean", "ratio"])
def test_zero_users_everywhere(metric: str) -> None:
    result = analyze_metric(metric, [empty("A"), empty("B")], "A", SEQ)
    check(result)
    for entry in result:
        assert entry["mean"] is None and entry["std"] is None and entry["conversion_rate"] is None
    out = result[1]["vs_control"]
    assert out["reason"]["code"] == "empty_control"
    assert out["absolute_lift"] is None and out["relative_lift"] is None


def test_empty_control_and_empty_variant() -> None:
    x = np.r_[np.zeros(50), np.ones(50)]
    assert vs("proportion", [empty("A"), moments("B", x)])["reason"]["code"] == "empty_control"
    out = vs("proportion", [moments("A", x), empty("B")])
    assert out["reason"]["code"] == "empty_variant" and out["absolute_lift"] is None


@pytest.mark.parametrize("metric", ["proportion", "mean"])
def test_one_user_per_arm(metric: str) -> None:
    one = moments("A", np.ones(1)), moments("B", np.zeros(1))
    result = analyze_metric(metric, list(one), "A", AnalysisOptions(min_exposed=0, min_conversions=0, sequential=True))
    check(result)
    assert result[0]["std"] is None and result[0]["mean"] == 1.0
    out = result[1]["vs_control"]
    assert out["reason"]["code"] == "below_min_exposed" and "2" in out["reason"]["message"]
    assert out["absolute_lift"] == -1.0  # descriptive lifts stay


def test_below_the_minimum_sample_and_conversions() -> None:
    rng = np.random.default_rng(0)
    small = vs("mean", [moments("A", rng.normal(5, 1, 49)), moments("B", rng.normal(5, 1, 500))])
    assert small["reason"]["code"] == "below_min_exposed"
    assert small["absolute_lift"] is not None and small["relative_lift"] is not None
    few = np.r_[np.ones(4), np.zeros(996)]
    enough = np.r_[np.ones(40), np.zeros(960)]
    out = vs("proportion", [moments("A", few), moments("B", enough)])
    assert out["reason"]["code"] == "below_min_conversions" and "converters" in out["reason"]["message"]
    out = vs("proportion", [moments("A", few), moments("B", enough)], AnalysisOptions(min_conversions=4))
    assert out["reason"] is None
    revenue = np.r_[rng.lognormal(3, 1, 3), np.zeros(997)]
    out = vs("mean", [moments("A", revenue), moments("B", enough)])
    assert out["reason"]["code"] == "below_min_conversions" and "non-zero" in out["reason"]["message"]


def test_zero_variance_in_both_arms() -> None:
    for metric, value in (("mean", 3.0), ("proportion", 1.0), ("proportion", 0.0), ("mean", 1e15)):
        opts = AnalysisOptions(min_conversions=0, sequential=True)
        out = vs(metric, [moments("A", np.full(100, value)), moments("B", np.full(120, value))], opts)
        assert out["reason"]["code"] == "zero_variance", (metric, value)
        assert out["absolute_lift"] == 0.0


def test_all_converted_in_one_arm_only() -> None:
    out = vs("proportion", [moments("A", np.r_[np.ones(90), np.zeros(10)]), moments("B", np.ones(100))])
    assert out["reason"] is None and out["p_value"] < 0.01
    close(out["absolute_lift"], 0.1)


def test_control_mean_zero_keeps_absolute_figures() -> None:
    rng = np.random.default_rng(1)
    control = VariantMoments("A", n=200, users_with_metric=100, sum_x=0.0, sum_x2=150.0)  # mean 0, variance > 0
    out = vs("mean", [control, moments("B", rng.normal(0.3, 1, 200))])
    assert out["reason"] is None and out["relative_reason"]["code"] == "zero_control_mean"
    assert out["relative_lift"] is None and out["relative_ci"] is None
    assert out["p_value"] is not None and out["absolute_ci"] is not None
    assert out["sequential"]["relative_ci"] is None and out["sequential"]["absolute_ci"] is not None
    # a proportion with no control conversions: relative undefined, absolute fine
    out = vs(
        "proportion",
        [moments("A", np.zeros(500)), moments("B", np.r_[np.ones(20), np.zeros(480)])],
        AnalysisOptions(min_conversions=0),
    )
    assert out["reason"] is None and out["relative_reason"]["code"] == "zero_control_mean"
    assert out["relative_lift"] is None and out["p_value"] < 0.001


@pytest.mark.parametrize("scale", [1e15, 1e100, 1e150])
def test_huge_values_are_scale_invariant(scale: float) -> None:
    """Multiplying every value by a huge constant leaves p-values and relative figures unchanged."""
    rng = np.random.default_rng(2)
    y0, y1 = rng.lognormal(0, 1, 400), rng.lognormal(0, 1, 420)
    x0, x1 = y0 * rng.lognormal(0, 0.5, 400), 1.1 * y1 * rng.lognormal(0, 0.5, 420)
    base = analyze_metric("mean", [moments("A", x0, y0), moments("B", x1, y1)], "A", SEQ)[1]["vs_control"]
    big = analyze_metric("mean", [moments("A", x0 * scale, y0 * scale), moments("B", x1 * scale, y1 * scale)], "A", SEQ)
    check(big)
    out = big[1]["vs_control"]
    assert out["reason"] is None
    for figure in ("p_value", "relative_lift"):
        np.testing.assert_allclose(out[figure], base[figure], rtol=1e-8)
    np.testing.assert_allclose(out["absolute_lift"], base["absolute_lift"] * scale, rtol=1e-8)
    np.testing.assert_allclose(out["cuped"]["p_value"], base["cuped"]["p_value"], rtol=1e-6)
    np.testing.assert_allclose(out["sequential"]["p_value"], base["sequential"]["p_value"], rtol=1e-8)
    np.testing.assert_allclose(out["bayesian"]["chance_to_beat_control"], base["bayesian"]["chance_to_beat_control"])


def test_overflowing_figures_become_a_numerical_error_reason() -> None:
    """A ratio over denominators of 1e-200: the inputs are finite but R^2 Var(y) overflows. The output says so
    instead of carrying NaN or passing the overflow off as zero variance."""
    rng = np.random.default_rng(6)
    ys = rng.random(100) * 1e-200, rng.random(100) * 1e-200
    xs = rng.random(100), rng.random(100)
    result = analyze_metric("ratio", [moments("A", xs[0], ys[0]), moments("B", xs[1], ys[1])], "A", SEQ)
    check(result)
    out = result[1]["vs_control"]
    assert out["reason"]["code"] == "numerical_error"
    assert result[1]["mean"] is not None and out["relative_lift"] is not None


def test_ratio_guards() -> None:
    rng = np.random.default_rng(3)
    y = rng.poisson(3, 300) + 1.0
    x = rng.binomial(y.astype(int), 0.2).astype(float)
    zero_den = VariantMoments("B", n=300, users_with_metric=0, sum_x=0, sum_x2=0, sum_y=0, sum_y2=0, sum_xy=0)
    result = analyze_metric("ratio", [moments("A", x, y), zero_den], "A", AnalysisOptions(min_conversions=0))
    check(result)
    assert result[1]["mean"] is None and result[1]["denominator_mean"] == 0.0
    assert result[1]["vs_control"]["reason"]["code"] == "zero_denominator"
    out = vs("ratio", [moments("A", 0.25 * y, y), moments("B", 0.25 * y, y)])  # x proportional to y: no variance
    assert out["reason"]["code"] == "zero_variance"


def test_cuped_reasons() -> None:
    rng = np.random.default_rng(4)
    x0, x1 = rng.normal(10, 2, 300), rng.normal(10.2, 2, 300)
    out = vs("mean", [moments("A", x0), moments("B", x1)])
    assert out["reason"] is None and out["cuped"]["reason"]["code"] == "no_covariate"
    out = vs("mean", [moments("A", x0, x0 + 1), moments("B", x1)])  # one variant without a covariate
    assert out["cuped"]["reason"]["code"] == "no_covariate"
    out = vs("mean", [moments("A", x0, np.full(300, 7.0)), moments("B", x1, np.full(300, 7.0))])
    assert out["cuped"]["reason"]["code"] == "zero_covariate_variance"
    out = vs("mean", [moments("A", x0, 2 * x0), moments("B", x1, 2 * x1)])  # x linear in y
    assert out["cuped"]["reason"]["code"] == "zero_adjusted_variance"
    assert out["p_value"] is not None


def test_nothing_but_reasons_when_the_guard_applies() -> None:
    out = vs("mean", [empty("A"), moments("B", np.arange(100.0), np.arange(100.0))])
    assert out["cuped"] is None and out["sequential"] is None and out["bayesian"] is None


def test_random_degenerate_inputs_never_produce_nan() -> None:
    """Fuzz: small, sparse, constant and extreme data for every metric type; strict JSON every time."""
    rng = np.random.default_rng(5)
    makers = [
        lambda n: np.zeros(n),
        lambda n: np.ones(n),
        lambda n: (rng.random(n) < 0.02).astype(float),
        lambda n: (rng.random(n) < 0.98).astype(float),
        lambda n: rng.normal(0, 1, n),
        lambda n: rng.lognormal(0, 3, n) * (rng.random(n) < 0.1),
        lambda n: np.full(n, 1e15) + rng.normal(0, 1, n),
        lambda n: rng.normal(0, 1e-9, n),
        lambda n: rng.choice([-1e12, 0.0, 1e12], n),
    ]
    for _ in range(300):
        metric = ("proportion", "mean", "ratio")[rng.integers(3)]
        variants = []
        for key in "ABC"[: rng.integers(2, 4)]:
            n = int(rng.choice([0, 1, 2, 3, 10, 60, 500]))
            if metric == "proportion":
                x = (rng.random(n) < rng.choice([0.0, 0.01, 0.5, 1.0])).astype(float)
                y = (rng.random(n) < 0.5).astype(float)
            else:
                x = makers[rng.integers(len(makers))](n)
                y = makers[rng.integers(len(makers))](n)
                if metric == "ratio":
                    y = np.abs(y)
            variants.append(moments(key, x, y if rng.random() < 0.8 or metric == "ratio" else None))
        opts = AnalysisOptions(
            level=float(rng.choice([0.9, 0.95, 0.99])),
            sequential=bool(rng.random() < 0.5),
            min_exposed=int(rng.choice([0, 2, 50])),
            min_conversions=int(rng.choice([0, 5])),
        )
        check(analyze_metric(metric, variants, "A", opts))


def test_numpy_scalars_in_plain_numbers_out() -> None:
    """Rollup readers may hand over numpy scalars; the output is still plain JSON types."""
    rng = np.random.default_rng(7)
    x0, x1 = rng.normal(1, 1, 200), rng.normal(1.2, 1, 200)
    variants = [
        VariantMoments(k, np.int64(len(x)), np.int64(len(x)), np.float64(x.sum()), np.float64(x @ x))
        for k, x in (("A", x0), ("B", x1))
    ]
    result = analyze_metric("mean", variants, "A", AnalysisOptions(level=np.float64(0.9), sequential=True))
    check(result)
    assert type(result[0]["exposed_users"]) is int and type(result[1]["vs_control"]["level"]) is float
    with pytest.raises(ValueError, match="integers"):
        analyze_metric("mean", [VariantMoments("A", 10.0, 1, 1.0, 1.0), variants[1]], "A")
