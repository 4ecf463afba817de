"""Simulated experiments with a known truth (vectorised numpy, fixed seeds): interval coverage, A/A false
positives, always-valid inference under daily peeking, and CUPED's variance reduction.

Rates are checked against a binomial band: with 2000 experiments the observed rate of a true 5% lies in
[3.9%, 6.2%] with probability 0.9999, so a failure means a biased method, not bad luck.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from abstream.stats import AnalysisOptions, VariantMoments, analyze_metric
from abstream.stats.inference import sequential_multiplier, sequential_p_value, two_proportions
from tests.test_stats import close

LEVEL = 0.95


def band(rate: float, trials: int) -> tuple[float, float]:
    low, high = stats.binom.interval(0.9999, trials, rate)
    return low / trials, high / trials


def batch_moments(key: str, x: np.ndarray, y: np.ndarray | None = None) -> list[VariantMoments]:
    """One VariantMoments per row of x (experiments x users)."""
    n = x.shape[1]
    nz = np.count_nonzero(x, axis=1)
    sx, sx2 = x.sum(axis=1), (x * x).sum(axis=1)
    if y is None:
        return [VariantMoments(key, n, int(a), float(b), float(c)) for a, b, c in zip(nz, sx, sx2, strict=True)]
    sy, sy2, sxy = y.sum(axis=1), (y * y).sum(axis=1), (x * y).sum(axis=1)
    return [
        VariantMoments(key, n, int(a), float(b), float(c), float(d), float(e), float(f))
        for a, b, c, d, e, f in zip(nz, sx, sx2, sy, sy2, sxy, strict=True)
    ]


def run(metric: str, controls: list[VariantMoments], treatments: list[VariantMoments]) -> list[dict]:
    opts = AnalysisOptions(level=LEVEL, min_exposed=2, min_conversions=0)
    return [
        analyze_metric(metric, [c, t], "A", opts)[1]["vs_control"] for c, t in zip(controls, treatments, strict=True)
    ]


def covers(results: list[dict], truth: float, field: str = "absolute_ci") -> float:
    return float(np.mean([r[field]["low"] <= truth <= r[field]["high"] for r in results]))


def rejects(results: list[dict]) -> float:
    return float(np.mean([r["p_value"] < 1 - LEVEL for r in results]))


def test_mean_metric_coverage_and_aa_false_positive_rate() -> None:
    """Skewed (exponential) revenue-like data, 200 users per arm: Welch's interval still covers ~95%."""
    rng = np.random.default_rng(101)
    experiments, n = 2000, 200
    control = rng.exponential(1.0, (experiments, n))
    treated = rng.exponential(1.15, (experiments, n))
    results = run("mean", batch_moments("A", control), batch_moments("B", treated))
    lo, hi = band(0.95, experiments)
    assert lo <= covers(results, 0.15) <= hi
    assert lo <= covers(results, 0.15, "relative_ci") <= hi  # relative truth 1.15 / 1 - 1
    aa = run("mean", batch_moments("A", control), batch_moments("B", rng.exponential(1.0, (experiments, n))))
    lo, hi = band(0.05, experiments)
    assert lo <= rejects(aa) <= hi


def test_proportion_coverage_and_aa_false_positive_rate() -> None:
    rng = np.random.default_rng(102)
    experiments, n = 2000, 1000
    control = (rng.random((experiments, n)) < 0.10).astype(float)
    treated = (rng.random((experiments, n)) < 0.12).astype(float)
    results = run("proportion", batch_moments("A", control), batch_moments("B", treated))
    lo, hi = band(0.95, experiments)
    assert lo <= covers(results, 0.02) <= hi
    assert lo <= covers(results, 0.2, "relative_ci") <= hi
    aa = run("proportion", batch_moments("A", control), batch_moments("B", (rng.random((experiments, n)) < 0.10) * 1.0))
    lo, hi = band(0.05, experiments)
    assert lo <= rejects(aa) <= hi


def test_ratio_coverage() -> None:
    """Clicks per session with per-user click-through heterogeneity: the delta method covers ~95%."""
    rng = np.random.default_rng(103)
    experiments, n = 1000, 400
    arms = []
    for ctr in (0.20, 0.22):
        sessions = rng.poisson(3, (experiments, n)) + 1.0
        clicks = rng.binomial(sessions.astype(int), rng.beta(4, 4 * (1 - ctr) / ctr, (experiments, n))).astype(float)
        arms.append((clicks, sessions))
    results = run("ratio", batch_moments("A", *arms[0]), batch_moments("B", *arms[1]))
    lo, hi = band(0.95, experiments)
    assert lo <= covers(results, 0.02) <= hi


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_cuped_variance_reduction_is_rho_squared(rho: float) -> None:
    rng = np.random.default_rng(104)
    n = 20000
    variants = []
    for key, effect in (("A", 0.0), ("B", 0.1)):
        y = rng.normal(0, 1, n)
        x = 5 + effect + rho * y + np.sqrt(1 - rho**2) * rng.normal(0, 1, n)
        variants.append(batch_moments(key, x[None, :], y[None, :])[0])
    vs = analyze_metric("mean", variants, "A")[1]["vs_control"]
    cu = vs["cuped"]
    assert abs(cu["variance_reduction"] - rho**2) < 0.02
    assert abs(cu["theta"] - rho) < 0.02
    width = vs["absolute_ci"]["high"] - vs["absolute_ci"]["low"]
    cuped_width = cu["absolute_ci"]["high"] - cu["absolute_ci"]["low"]
    assert abs(cuped_width / width - np.sqrt(1 - rho**2)) < 0.03


def test_cuped_interval_coverage_and_aa_false_positive_rate() -> None:
    rng = np.random.default_rng(105)
    experiments, n, rho = 2000, 300, 0.7

    def arm(effect: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.gamma(2.0, 1.0, (experiments, n))
        x = y * rho + effect + rng.normal(0, 1, (experiments, n))
        return x, y

    control = batch_moments("A", *arm(0.0))
    results = run("mean", control, batch_moments("B", *arm(0.1)))
    cuped = [r["cuped"] for r in results]
    lo, hi = band(0.95, experiments)
    assert lo <= covers(cuped, 0.1) <= hi
    aa = [r["cuped"] for r in run("mean", control, batch_moments("B", *arm(0.0)))]
    lo, hi = band(0.05, experiments)
    assert lo <= rejects(aa) <= hi


def test_sequential_stays_valid_under_daily_peeking() -> None:
    """A/A tests looked at daily for 20 days: stopping at the first p < 0.05 makes the fixed-horizon test's
    false-positive rate several times 5%; the always-valid p-value stays below 5%. Conversions are drawn as
    daily binomial counts (exactly per-user Bernoulli); all looks go through the engine's kernels at once, and
    a sample of looks is checked against analyze_metric itself."""
    rng = np.random.default_rng(106)
    experiments, days, per_day, p = 2000, 20, 250, 0.1
    alpha, tuning = 1 - LEVEL, 5000.0
    conv = rng.binomial(per_day, p, (experiments, days, 2)).cumsum(axis=1)
    n = per_day * np.arange(1, days + 1)[None, :]
    c0, c1 = conv[..., 0], conv[..., 1]
    fixed = two_proportions(c0, n, c1, n, LEVEL)
    seq_p = sequential_p_value(fixed.diff, fixed.se, 2 * n, alpha, tuning)
    fixed_any = float(np.mean((fixed.p_value < alpha).any(axis=1)))
    seq_any = float(np.mean((seq_p < alpha).any(axis=1)))
    assert fixed_any > 0.15
    assert seq_any <= band(0.05, experiments)[1]
    assert float(np.mean(fixed.p_value[:, -1] < alpha)) <= band(0.05, experiments)[1]  # one look: fine

    opts = AnalysisOptions(level=LEVEL, sequential=True, sequential_tuning=tuning)
    for e, d in zip(rng.integers(0, experiments, 25), rng.integers(0, days, 25), strict=True):
        size = int(n[0, d])
        variants = [VariantMoments(k, size, int(c), float(c), float(c)) for k, c in (("A", c0[e, d]), ("B", c1[e, d]))]
        vs = analyze_metric("proportion", variants, "A", opts)[1]["vs_control"]
        close(vs["p_value"], fixed.p_value[e, d])
        close(vs["sequential"]["p_value"], seq_p[e, d])


def test_sequential_interval_covers_a_real_effect_at_every_look() -> None:
    """With a true lift, the confidence sequence contains it at all 20 looks in >= 95% of experiments."""
    rng = np.random.default_rng(107)
    experiments, days, per_day = 2000, 20, 250
    alpha, tuning = 1 - LEVEL, 5000.0
    c0 = rng.binomial(per_day, 0.10, (experiments, days)).cumsum(axis=1)
    c1 = rng.binomial(per_day, 0.12, (experiments, days)).cumsum(axis=1)
    n = per_day * np.arange(1, days + 1)[None, :]
    fixed = two_proportions(c0, n, c1, n, LEVEL)
    half = sequential_multiplier(2 * n, alpha, tuning) * fixed.se
    missed = (np.abs(fixed.diff - 0.02) > half).any(axis=1)
    assert float(np.mean(missed)) <= band(0.05, experiments)[1]
