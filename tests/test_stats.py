"""abstream.stats agrees with SciPy/statsmodels run on the raw per-user arrays (to 1e-6 relative).

The engine only ever sees sums (VariantMoments); these tests draw per-user data with fixed seeds, hand the
engine the sums, and compute every figure independently from the arrays.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from abstream.stats import AnalysisOptions, VariantMoments, analyze_metric, holm_adjust, srm_check

RTOL = 1e-6
ATOL = 1e-12


def moments(key: str, x: np.ndarray, y: np.ndarray | None = None) -> VariantMoments:
    """The sufficient statistics a rollup would produce for per-user values x (and covariate/denominator y)."""
    x = np.asarray(x, dtype=float)
    extra: dict[str, float] = {}
    if y is not None:
        y = np.asarray(y, dtype=float)
        extra = {"sum_y": float(y.sum()), "sum_y2": float((y * y).sum()), "sum_xy": float((x * y).sum())}
    return VariantMoments(
        key=key,
        n=len(x),
        users_with_metric=int(np.count_nonzero(x)),
        sum_x=float(x.sum()),
        sum_x2=float((x * x).sum()),
        **extra,
    )


def close(actual: Any, expected: Any) -> None:
    assert actual is not None
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def close_ci(ci: dict[str, float] | None, low: float, high: float) -> None:
    assert ci is not None and set(ci) == {"low", "high"}
    close([ci["low"], ci["high"]], [low, high])


def json_clean(result: Any) -> None:
    """The output is strict JSON: no NaN or Infinity anywhere."""
    json.dumps(result, allow_nan=False)


def relative_reference(x0: np.ndarray, x1: np.ndarray, q: float) -> tuple[float, float, float]:
    """(lift, low, high) of (m1 - m0) / m0 with var(m1)/m0^2 + m1^2 var(m0)/m0^4, z interval."""
    m0, m1 = x0.mean(), x1.mean()
    v0, v1 = x0.var(ddof=1) / len(x0), x1.var(ddof=1) / len(x1)
    lift = (m1 - m0) / m0
    se = math.sqrt(v1 / m0**2 + m1**2 * v0 / m0**4)
    return lift, lift - q * se, lift + q * se


def sequential_reference(diff: float, se: float, n_total: int, alpha: float, tuning: float) -> tuple[float, float]:
    """Half-width and always-valid p-value in Howard et al.'s normal-mixture form, written independently of the
    engine: |S_N| <= sqrt((V + r) log((V + r) / (r alpha^2))) on the standardised sum (V = N) with mixture
    variance r = 1/rho^2; the p-value is the alpha at which that boundary (same rho) touches zero."""
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    r = 1 / rho2
    sigma = se * math.sqrt(n_total)  # per-user standard deviation of the difference estimator

    def half(log_a: float) -> float:
        return sigma / n_total * math.sqrt((n_total + r) * (math.log((n_total + r) / r) - 2 * log_a))

    width = half(math.log(alpha))
    if half(0.0) >= abs(diff):
        return width, 1.0
    log_p = optimize.brentq(lambda la: half(la) - abs(diff), -1e6, 0.0, xtol=1e-13, rtol=1e-15)
    return width, math.exp(log_p)


def bayes_reference(diff: float, se: float) -> tuple[float, float]:
    chance = stats.norm.cdf(diff / se)
    loss = stats.norm(loc=-diff, scale=se).expect(lambda u: u, lb=0.0, epsabs=0, epsrel=1e-12)
    return chance, loss


# ---- data shapes ------------------------------------------------------------------------------------------


def mean_shapes() -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """(name, x per variant, pre-period y per variant) for several distributions and sizes."""
    rng = np.random.default_rng(20240611)
    out = []
    # normal, unequal variances and sizes, pre-period correlated rho ~ 0.7
    xs, ys = [], []
    for n, shift, sd in ((800, 0.0, 2.0), (1300, 0.25, 3.0)):
        y = rng.normal(10, 2.5, n)
        xs.append(10 + shift + 0.7 * (y - 10) * sd / 2.5 + rng.normal(0, sd * math.sqrt(1 - 0.49), n))
        ys.append(y)
    out.append(("normal", xs, ys))
    # zero-inflated lognormal revenue; the covariate is last month's revenue of the same user
    xs, ys = [], []
    for n, lift in ((3000, 1.0), (2900, 1.08)):
        spend = rng.lognormal(3, 1, n) * (rng.random(n) < 0.3)
        y = spend * rng.lognormal(0, 0.3, n)
        x = lift * spend * rng.lognormal(0, 0.3, n) * (rng.random(n) < 0.9)
        xs.append(x)
        ys.append(y)
    out.append(("revenue", xs, ys))
    # small samples: the t quantile and the Welch df matter
    xs = [rng.normal(5, 1, 60), rng.normal(5.6, 2.5, 75)]
    ys = [x + rng.normal(0, 1, len(x)) for x in xs]
    out.append(("small", xs, ys))
    # three variants: one theta pooled over all of them; counts data
    xs, ys = [], []
    for n, lam in ((2000, 3.0), (2100, 3.1), (1900, 2.8)):
        y = rng.poisson(lam, n).astype(float)
        xs.append(y + rng.poisson(0.5, n))
        ys.append(y)
    out.append(("counts3", xs, ys))
    return out


SHAPES = mean_shapes()


def cuped_reference(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[float, float, list[np.ndarray]]:
    """theta = OLS slope of x on y with one intercept per variant; the adjusted arrays; the pooled variance
    reduction 1 - RSS / within-variant sum of squares of x."""
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    groups = np.repeat(np.arange(len(xs)), [len(a) for a in xs])
    design = np.column_stack([(groups == g).astype(float) for g in range(len(xs))] + [y])
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    theta = coef[-1]
    resid = x - design @ coef
    within = sum(((a - a.mean()) ** 2).sum() for a in xs)
    reduction = 1 - (resid @ resid) / within
    y_bar = y.mean()
    return theta, reduction, [a - theta * (b - y_bar) for a, b in zip(xs, ys, strict=True)]


# ---- mean metrics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.90, 0.95, 0.99])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_mean_metric_matches_scipy_and_statsmodels(shape, level: float) -> None:
    _, xs, ys = shape
    keys = [f"v{i}" for i in range(len(xs))]
    variants = [moments(k, x, y) for k, x, y in zip(keys, xs, ys, strict=True)]
    opts = AnalysisOptions(level=level, sequential=True)
    result = analyze_metric("mean", variants, "v0", opts)
    json_clean(result)
    alpha, q = 1 - level, stats.norm.ppf(0.5 + level / 2)
    theta, reduction, adjusted = cuped_reference(xs, ys)
    x0 = xs[0]
    assert [r["variant_key"] for r in result] == keys
    for i, (entry, x) in enumerate(zip(result, xs, strict=True)):
        assert entry["exposed_users"] == len(x) and entry["users_with_metric"] == np.count_nonzero(x)
        close(entry["mean"], x.mean())
        close(entry["std"], x.std(ddof=1))
        assert entry["conversion_rate"] is None and entry["numerator_mean"] is None
        assert entry["is_control"] is (i == 0)
        if i == 0:
            assert entry["vs_control"] is None
            continue
        vs = entry["vs_control"]
        assert vs["test"] == "welch_t" and vs["reason"] is None and vs["level"] == level
        # Welch t-test and its Welch-Satterthwaite t interval
        ref_p = stats.ttest_ind(x, x0, equal_var=False).pvalue
        close(vs["p_value"], ref_p)
        assert vs["significant"] is bool(ref_p < alpha)
        close(vs["absolute_lift"], x.mean() - x0.mean())
        cm = CompareMeans(DescrStatsW(x), DescrStatsW(x0))
        close_ci(vs["absolute_ci"], *cm.tconfint_diff(alpha=alpha, usevar="unequal"))
        lift, low, high = relative_reference(x0, x, q)
        close(vs["relative_lift"], lift)
        close_ci(vs["relative_ci"], low, high)
        # CUPED: Welch on x - theta (y - y_bar), theta from the within-variant OLS over all variants
        cu = vs["cuped"]
        a0, a = adjusted[0], adjusted[i]
        assert cu["reason"] is None and cu["test"] == "welch_t"
        close(cu["theta"], theta)
        close(cu["variance_reduction"], reduction)
        close(cu["absolute_lift"], a.mean() - a0.mean())
        close(cu["p_value"], stats.ttest_ind(a, a0, equal_var=False).pvalue)
        close_ci(
            cu["absolute_ci"], *CompareMeans(DescrStatsW(a), DescrStatsW(a0)).tconfint_diff(alpha, usevar="unequal")
        )
        lift, low, high = relative_reference(a0, a, q)
        close(cu["relative_lift"], lift)
        close_ci(cu["relative_ci"], low, high)
        # sequential: Gaussian-mixture CS around the Welch estimate
        diff = x.mean() - x0.mean()
        se = cm.std_meandiff_separatevar
        half, p_seq = sequential_reference(diff, se, len(x) + len(x0), alpha, 5000)
        seq = vs["sequential"]
        assert seq["method"] == "gaussian_mixture_confidence_sequence" and seq["tuning"] == 5000
        close_ci(seq["absolute_ci"], diff - half, diff + half)
        close(seq["p_value"], p_seq)
        _, rel_low, rel_high = relative_reference(x0, x, half / se)
        close_ci(seq["relative_ci"], rel_low, rel_high)
        # flat-prior normal posterior
        chance, loss = bayes_reference(diff, se)
        close(vs["bayesian"]["chance_to_beat_control"], chance)
        np.testing.assert_allclose(vs["bayesian"]["expected_loss"], loss, rtol=RTOL, atol=1e-12 * se)
        assert vs["bayesian"]["prior"].startswith("flat")


def test_sequential_interval_is_wider_than_fixed_and_p_value_consistent() -> None:
    _, xs, ys = SHAPES[0]
    for tuning in (100.0, 5000.0, 1e6):
        vs = analyze_metric(
            "mean",
            [moments("A", xs[0]), moments("B", xs[1])],
            "A",
            AnalysisOptions(sequential=True, sequential_tuning=tuning),
        )[1]["vs_control"]
        seq = vs["sequential"]
        assert (
            seq["absolute_ci"]["low"]
            < vs["absolute_ci"]["low"]
            < vs["absolute_ci"]["high"]
            < seq["absolute_ci"]["high"]
        )
        assert seq["p_value"] >= vs["p_value"]
        excludes_zero = seq["absolute_ci"]["low"] > 0 or seq["absolute_ci"]["high"] < 0
        assert excludes_zero is (seq["p_value"] < 0.05)


# ---- proportions --------------------------------------------------------------------------------------------


def proportion_data(seed: int, n0: int, n1: int, p0: float, p1: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """0/1 conversions with a 0/1 pre-period conversion that raises the chance of converting again."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for n, p in ((n0, p0), (n1, p1)):
        y = (rng.random(n) < 0.2).astype(float)
        x = (rng.random(n) < np.where(y == 1, min(1.0, 2.5 * p), 0.625 * p)).astype(float)
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("level", [0.90, 0.95, 0.99])
@pytest.mark.parametrize(
    ("n0", "n1", "p0", "p1"), [(5000, 5100, 0.10, 0.115), (400, 380, 0.3, 0.26), (20000, 20000, 0.02, 0.021)]
)
def test_proportion_metric_matches_statsmodels(n0: int, n1: int, p0: float, p1: float, level: float) -> None:
    xs, ys = proportion_data(n0 + n1, n0, n1, p0, p1)
    result = analyze_metric(
        "proportion",
        [moments("A", xs[0], ys[0]), moments("B", xs[1], ys[1])],
        "A",
        AnalysisOptions(level=level, sequential=True),
    )
    json_clean(result)
    alpha, q = 1 - level, stats.norm.ppf(0.5 + level / 2)
    c0, c1 = int(xs[0].sum()), int(xs[1].sum())
    for entry, x in zip(result, xs, strict=True):
        close(entry["conversion_rate"], x.mean())
        close(entry["mean"], x.mean())
        close(entry["std"], x.std(ddof=1))
    vs = result[1]["vs_control"]
    assert vs["test"] == "two_proportion_z"
    close(vs["p_value"], proportions_ztest([c1, c0], [n1, n0])[1])  # pooled SE
    close_ci(vs["absolute_ci"], *confint_proportions_2indep(c1, n1, c0, n0, method="wald", compare="diff", alpha=alpha))
    m0, m1 = c0 / n0, c1 / n1
    se0, se1 = math.sqrt(m0 * (1 - m0) / n0), math.sqrt(m1 * (1 - m1) / n1)  # Wald (ddof 0) variances
    lift = (m1 - m0) / m0
    se_rel = math.sqrt(se1**2 / m0**2 + m1**2 * se0**2 / m0**4)
    close(vs["relative_lift"], lift)
    close_ci(vs["relative_ci"], lift - q * se_rel, lift + q * se_rel)
    se = math.hypot(se0, se1)
    half, p_seq = sequential_reference(m1 - m0, se, n0 + n1, alpha, 5000)
    close_ci(vs["sequential"]["absolute_ci"], m1 - m0 - half, m1 - m0 + half)
    close(vs["sequential"]["p_value"], p_seq)
    chance, loss = bayes_reference(m1 - m0, se)
    close(vs["bayesian"]["chance_to_beat_control"], chance)
    np.testing.assert_allclose(vs["bayesian"]["expected_loss"], loss, rtol=RTOL, atol=1e-12 * se)
    # CUPED on 0/1 values: z test with the arms' own (ddof=1) variances of the adjusted values
    theta, reduction, (a0, a1) = cuped_reference(xs, ys)
    cu = vs["cuped"]
    assert cu["test"] == "wald_z" and cu["reason"] is None
    close(cu["theta"], theta)
    close(cu["variance_reduction"], reduction)
    cm = CompareMeans(DescrStatsW(a1), DescrStatsW(a0))
    close(cu["absolute_lift"], a1.mean() - a0.mean())
    close(cu["p_value"], cm.ztest_ind(usevar="unequal")[1])
    close_ci(cu["absolute_ci"], *cm.zconfint_diff(alpha=alpha, usevar="unequal"))
    lift, low, high = relative_reference(a0, a1, q)
    close(cu["relative_lift"], lift)
    close_ci(cu["relative_ci"], low, high)


# ---- ratio metrics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.90, 0.95, 0.99])
def test_ratio_metric_matches_linearisation(level: float) -> None:
    """Clicks per session: R = sum x / sum y; the delta-method variance equals the variance of the linearised
    per-user values (x - R y) / mean(y), computed here from the arrays."""
    rng = np.random.default_rng(7)
    xs, ys = [], []
    for n, ctr in ((3000, 0.20), (3200, 0.22)):
        sessions = rng.poisson(3, n) + 1.0
        xs.append(rng.binomial(sessions.astype(int), rng.beta(2, 2 * (1 - ctr) / ctr, n)).astype(float))
        ys.append(sessions)
    result = analyze_metric(
        "ratio",
        [moments("A", xs[0], ys[0]), moments("B", xs[1], ys[1])],
        "A",
        AnalysisOptions(level=level, sequential=True),
    )
    json_clean(result)
    alpha, q = 1 - level, stats.norm.ppf(0.5 + level / 2)
    ratios, lins = [], []
    for entry, x, y in zip(result, xs, ys, strict=True):
        r = x.sum() / y.sum()
        ratios.append(r)
        lins.append((x - r * y) / y.mean())
        close(entry["mean"], r)
        close(entry["numerator_mean"], x.mean())
        close(entry["denominator_mean"], y.mean())
        assert entry["std"] is None and entry["conversion_rate"] is None
    vs = result[1]["vs_control"]
    assert vs["test"] == "delta_method_z"
    r0, r1 = ratios
    var0, var1 = lins[0].var(ddof=1) / len(xs[0]), lins[1].var(ddof=1) / len(xs[1])
    se = CompareMeans(DescrStatsW(lins[1]), DescrStatsW(lins[0])).std_meandiff_separatevar
    close(se, math.sqrt(var0 + var1))
    close(vs["absolute_lift"], r1 - r0)
    close(vs["p_value"], 2 * stats.norm.sf(abs(r1 - r0) / se))
    close_ci(vs["absolute_ci"], r1 - r0 - q * se, r1 - r0 + q * se)
    lift = (r1 - r0) / r0
    se_rel = math.sqrt(var1 / r0**2 + r1**2 * var0 / r0**4)
    close(vs["relative_lift"], lift)
    close_ci(vs["relative_ci"], lift - q * se_rel, lift + q * se_rel)
    half, p_seq = sequential_reference(r1 - r0, se, len(xs[0]) + len(xs[1]), alpha, 5000)
    close_ci(vs["sequential"]["absolute_ci"], r1 - r0 - half, r1 - r0 + half)
    close(vs["sequential"]["p_value"], p_seq)
    assert vs["cuped"]["reason"]["code"] == "cuped_not_available_for_ratio"
    assert all(vs["cuped"][k] is None for k in vs["cuped"] if k != "reason")


# ---- output shape -------------------------------------------------------------------------------------------

ENTRY_KEYS = {
    "variant_key",
    "is_control",
    "exposed_users",
    "users_with_metric",
    "mean",
    "std",
    "conversion_rate",
    "numerator_mean",
    "denominator_mean",
    "vs_control",
}
VS_KEYS = {
    "test",
    "level",
    "absolute_lift",
    "absolute_ci",
    "relative_lift",
    "relative_ci",
    "p_value",
    "significant",
    "reason",
    "relative_reason",
    "cuped",
    "sequential",
    "bayesian",
}
CUPED_KEYS = {
    "test",
    "theta",
    "variance_reduction",
    "absolute_lift",
    "absolute_ci",
    "relative_lift",
    "relative_ci",
    "p_value",
    "reason",
}
SEQUENTIAL_KEYS = {"method", "tuning", "absolute_ci", "relative_ci", "p_value"}
BAYES_KEYS = {"chance_to_beat_control", "expected_loss", "prior"}


@pytest.mark.parametrize("metric_type", ["proportion", "mean", "ratio"])
@pytest.mark.parametrize("sequential", [False, True])
def test_output_shape_is_fixed(metric_type: str, sequential: bool) -> None:
    xs, ys = proportion_data(1, 500, 500, 0.3, 0.35)
    if metric_type == "ratio":
        ys = [y + 1 for y in ys]
    result = analyze_metric(
        metric_type,
        [moments("c", xs[0], ys[0]), moments("t", xs[1], ys[1])],
        "c",
        AnalysisOptions(sequential=sequential),
    )
    json_clean(result)
    for entry in result:
        assert set(entry) == ENTRY_KEYS
    vs = result[1]["vs_control"]
    assert set(vs) == VS_KEYS
    assert set(vs["cuped"]) == CUPED_KEYS
    assert set(vs["bayesian"]) == BAYES_KEYS
    assert isinstance(vs["significant"], bool)
    if sequential:
        assert set(vs["sequential"]) == SEQUENTIAL_KEYS
    else:
        assert vs["sequential"] is None


def test_control_need_not_come_first() -> None:
    _, xs, _ = SHAPES[3]
    variants = [moments(k, x) for k, x in zip("abc", xs, strict=True)]
    result = analyze_metric("mean", variants, "b")
    assert [r["is_control"] for r in result] == [False, True, False]
    vs = result[0]["vs_control"]
    close(vs["p_value"], stats.ttest_ind(xs[0], xs[1], equal_var=False).pvalue)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric_type": "median"}, "metric_type"),
        ({"control_key": "zz"}, "control"),
        ({"options": AnalysisOptions(level=1.0)}, "level"),
        ({"options": AnalysisOptions(sequential_tuning=0)}, "sequential_tuning"),
    ],
)
def test_contract_violations_raise_value_error(kwargs: dict, message: str) -> None:
    args = {"metric_type": "mean", "variants": [moments("A", np.ones(3)), moments("B", np.ones(3))], "control_key": "A"}
    with pytest.raises(ValueError, match=message):
        analyze_metric(**(args | kwargs))


@pytest.mark.parametrize(
    "variant",
    [
        VariantMoments("B", n=-1, users_with_metric=0, sum_x=0, sum_x2=0),
        VariantMoments("B", n=10, users_with_metric=11, sum_x=11, sum_x2=11),
        VariantMoments("B", n=10, users_with_metric=1, sum_x=math.inf, sum_x2=1),
        VariantMoments("B", n=10, users_with_metric=1, sum_x=1, sum_x2=math.nan),
        VariantMoments("B", n=10, users_with_metric=1, sum_x=1.0, sum_x2=-1.0),
    ],
)
def test_invalid_moments_raise_value_error(variant: VariantMoments) -> None:
    with pytest.raises(ValueError):
        analyze_metric("mean", [moments("A", np.ones(3)), variant], "A")


def test_proportion_needs_zero_one_values_and_ratio_needs_a_denominator() -> None:
    with pytest.raises(ValueError, match="0/1"):
        analyze_metric("proportion", [moments("A", np.array([0, 1, 2.0])), moments("B", np.ones(3))], "A")
    with pytest.raises(ValueError, match="denominator"):
        analyze_metric("ratio", [moments("A", np.ones(3)), moments("B", np.ones(3))], "A")


# ---- Holm and SRM -------------------------------------------------------------------------------------------


def test_holm_matches_statsmodels() -> None:
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 17):
        for _ in range(3):  # multipletests takes ~40 ms a call
            p = rng.random(size) ** 3
            p[rng.random(size) < 0.2] = p[0]  # ties
            close(holm_adjust(list(p)), multipletests(p, method="holm")[1])


def test_holm_keeps_none_and_does_not_count_it() -> None:
    adjusted = holm_adjust([0.01, None, 0.04, None, 0.03])
    assert adjusted[1] is None and adjusted[3] is None
    close([adjusted[0], adjusted[2], adjusted[4]], multipletests([0.01, 0.04, 0.03], method="holm")[1])
    assert holm_adjust([]) == []
    assert holm_adjust([None]) == [None]
    with pytest.raises(ValueError):
        holm_adjust([float("nan")])


@pytest.mark.parametrize(
    ("observed", "weights"),
    [
        ([5000, 5000], [50, 50]),
        ([5100, 4900], [0.5, 0.5]),
        ([5200, 4800], [1, 1]),
        ([3300, 3400, 3300], [0.34, 0.33, 0.33]),
        ([900, 100, 120], [8, 1, 1]),
        ([1, 0], [1, 1]),
    ],
)
def test_srm_matches_scipy_chisquare(observed: list[int], weights: list[float]) -> None:
    out = srm_check(observed, weights)
    json_clean(out)
    expected = np.asarray(weights, dtype=float) / sum(weights) * sum(observed)
    ref = stats.chisquare(observed, f_exp=expected)
    close(out["chi2"], ref.statistic)
    close(out["p_value"], ref.pvalue)
    close(out["expected"], expected)
    assert out["observed"] == observed and out["df"] == len(observed) - 1
    assert out["threshold"] == 0.001 and out["reason"] is None
    assert out["flagged"] is bool(ref.pvalue < 0.001)


def test_srm_flags_a_real_mismatch_and_handles_degenerate_input() -> None:
    assert srm_check([5300, 4700], [1, 1])["flagged"] is True
    empty = srm_check([0, 0], [1, 1])
    json_clean(empty)
    assert empty["p_value"] is None and empty["flagged"] is False and empty["reason"]["code"] == "no_users"
    stray = srm_check([10, 10, 3], [1, 1, 0])
    assert stray["flagged"] is True and stray["p_value"] == 0.0 and stray["chi2"] is None
    assert stray["reason"]["code"] == "traffic_in_zero_weight_variant"
    idle = srm_check([10, 10, 0], [1, 1, 0])  # a weight-0 variant without traffic is left out of the test
    assert idle["df"] == 1 and idle["p_value"] == 1.0 and idle["reason"] is None
    single = srm_check([10, 0], [1, 0])
    assert single["p_value"] is None and single["flagged"] is False and single["reason"]["code"] == "single_variant"
    for observed, weights in (([1], [1, 2]), ([], []), ([-1, 2], [1, 1]), ([1, 2], [0, 0]), ([1, 2], [1, math.nan])):
        with pytest.raises(ValueError):
            srm_check(observed, weights)


def test_every_reason_code_is_documented() -> None:
    from abstream.config import REPO_ROOT
    from abstream.stats import models

    doc = (REPO_ROOT / "docs" / "statistics.md").read_text(encoding="utf-8")
    codes = [v for k, v in vars(models).items() if k.isupper() and isinstance(v, str) and k != "METRIC_TYPES"]
    assert len(codes) >= 15
    assert [c for c in codes if f"`{c}`" not in doc] == []
