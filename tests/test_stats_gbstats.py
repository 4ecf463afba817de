"""abstream.stats against GrowthBook's engine (gbstats 0.8.0) where both use the same method.

gbstats is a peer, not a dependency: scripts/setup installs it with --no-deps, and these tests skip
without it. Where the two engines differ on purpose (docs/statistics.md), the tests pin the difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from abstream.stats import AnalysisOptions, analyze_metric, srm_check
from tests.test_stats import SHAPES, close, close_ci, moments, proportion_data

pytest.importorskip("gbstats")

from gbstats.frequentist.tests import (  # noqa: E402
    FrequentistConfig,
    SequentialConfig,
    SequentialTwoSidedTTest,
    TwoSidedTTest,
)
from gbstats.models.statistics import (  # noqa: E402
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)
from gbstats.utils import check_srm  # noqa: E402


def gb_mean(x: np.ndarray) -> SampleMeanStatistic:
    return SampleMeanStatistic(n=len(x), sum=float(x.sum()), sum_squares=float((x * x).sum()))


def gb_tests(stat_a, stat_b, level: float, tuning: float = 5000):
    """(absolute t-test, relative t-test, absolute sequential, relative sequential) results of gbstats."""
    alpha = 1 - level
    return (
        TwoSidedTTest(stat_a, stat_b, FrequentistConfig(alpha=alpha, difference_type="absolute")).compute_result(),
        TwoSidedTTest(stat_a, stat_b, FrequentistConfig(alpha=alpha, difference_type="relative")).compute_result(),
        SequentialTwoSidedTTest(
            stat_a,
            stat_b,
            SequentialConfig(alpha=alpha, difference_type="absolute", sequential_tuning_parameter=tuning),
        ).compute_result(),
        SequentialTwoSidedTTest(
            stat_a,
            stat_b,
            SequentialConfig(alpha=alpha, difference_type="relative", sequential_tuning_parameter=tuning),
        ).compute_result(),
    )


def relative_se(vs: dict, level: float) -> float:
    """Our relative-lift standard error, read back from the z interval."""
    ci = vs["relative_ci"]
    return (ci["high"] - ci["low"]) / (2 * stats.norm.ppf(0.5 + level / 2))


@pytest.mark.parametrize("tuning", [1000.0, 5000.0, 50000.0])
@pytest.mark.parametrize("level", [0.90, 0.95, 0.99])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_mean_metric_matches_gbstats(shape, level: float, tuning: float) -> None:
    _, xs, _ = shape
    x0, x1 = xs[0], xs[1]
    vs = analyze_metric(
        "mean",
        [moments("A", x0), moments("B", x1)],
        "A",
        AnalysisOptions(level=level, sequential=True, sequential_tuning=tuning),
    )[1]["vs_control"]
    absolute, rel, seq_abs, seq_rel = gb_tests(gb_mean(x0), gb_mean(x1), level, tuning)
    # Welch t: same estimate, interval and p-value
    close(vs["absolute_lift"], absolute.expected)
    close_ci(vs["absolute_ci"], *absolute.ci)
    close(vs["p_value"], absolute.p_value)
    # relative lift: same estimate and delta-method SE; gbstats takes the t quantile with Welch df, we take z
    close(vs["relative_lift"], rel.expected)
    close(relative_se(vs, level), rel.uplift.stddev)
    se2_0, se2_1 = x0.var(ddof=1) / len(x0), x1.var(ddof=1) / len(x1)
    df = (se2_0 + se2_1) ** 2 / (se2_0**2 / (len(x0) - 1) + se2_1**2 / (len(x1) - 1))
    half_t = stats.t.ppf(0.5 + level / 2, df) * rel.uplift.stddev
    close(rel.ci, [rel.expected - half_t, rel.expected + half_t])
    # sequential: the same Gaussian-mixture CS, absolute and relative, and the same always-valid p-value
    close_ci(vs["sequential"]["absolute_ci"], *seq_abs.ci)
    close(vs["sequential"]["p_value"], seq_abs.p_value)
    close_ci(vs["sequential"]["relative_ci"], *seq_rel.ci)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_cuped_matches_gbstats_given_the_same_theta(shape) -> None:
    """gbstats estimates theta from the covariance around the grand mean (all users of both arms); we centre
    within variants. With gbstats' theta replaced by ours, the adjusted Welch test agrees exactly."""
    _, xs, ys = shape
    (x0, x1), (y0, y1) = xs[:2], ys[:2]
    vs = analyze_metric("mean", [moments("A", x0, y0), moments("B", x1, y1)], "A")[1]["vs_control"]
    cu = vs["cuped"]

    def ra(x: np.ndarray, y: np.ndarray) -> RegressionAdjustedStatistic:
        return RegressionAdjustedStatistic(
            n=len(x),
            post_statistic=gb_mean(x),
            pre_statistic=gb_mean(y),
            post_pre_sum_of_products=float(x @ y),
            theta=0,
        )

    test = TwoSidedTTest(ra(x0, y0), ra(x1, y1), FrequentistConfig(difference_type="absolute"))
    x, y = np.concatenate([x0, x1]), np.concatenate([y0, y1])
    close(test.stat_a.theta, np.cov(x, y)[0, 1] / y.var(ddof=1))  # gbstats: grand-mean centred
    within = ((x0 - x0.mean()) @ (y0 - y0.mean()) + (x1 - x1.mean()) @ (y1 - y1.mean())) / (
        ((y0 - y0.mean()) ** 2).sum() + ((y1 - y1.mean()) ** 2).sum()
    )
    close(cu["theta"], within)  # ours: within-variant centred
    test.stat_a.theta = test.stat_b.theta = cu["theta"]
    res = test.compute_result()
    close(cu["absolute_lift"], res.expected)
    close_ci(cu["absolute_ci"], *res.ci)
    close(cu["p_value"], res.p_value)


def test_proportion_and_ratio_sequential_match_gbstats() -> None:
    xs, _ = proportion_data(11, 6000, 6100, 0.1, 0.11)
    c0, c1 = int(xs[0].sum()), int(xs[1].sum())
    vs = analyze_metric(
        "proportion", [moments("A", xs[0]), moments("B", xs[1])], "A", AnalysisOptions(sequential=True)
    )[1]["vs_control"]
    _, rel, seq_abs, seq_rel = gb_tests(ProportionStatistic(n=6000, sum=c0), ProportionStatistic(n=6100, sum=c1), 0.95)
    close_ci(vs["sequential"]["absolute_ci"], *seq_abs.ci)
    close(vs["sequential"]["p_value"], seq_abs.p_value)
    close_ci(vs["sequential"]["relative_ci"], *seq_rel.ci)
    close(relative_se(vs, 0.95), rel.uplift.stddev)

    rng = np.random.default_rng(5)
    ys = [rng.poisson(3, 4000) + 1.0, rng.poisson(3, 4100) + 1.0]
    xs = [rng.binomial(y.astype(int), p).astype(float) for y, p in zip(ys, (0.2, 0.21), strict=True)]
    vs = analyze_metric(
        "ratio", [moments("A", xs[0], ys[0]), moments("B", xs[1], ys[1])], "A", AnalysisOptions(sequential=True)
    )[1]["vs_control"]

    def ratio(x: np.ndarray, y: np.ndarray) -> RatioStatistic:
        return RatioStatistic(
            n=len(x), m_statistic=gb_mean(x), d_statistic=gb_mean(y), m_d_sum_of_products=float(x @ y)
        )

    absolute, rel, seq_abs, seq_rel = gb_tests(ratio(xs[0], ys[0]), ratio(xs[1], ys[1]), 0.95)
    close(vs["absolute_lift"], absolute.expected)
    se = (vs["absolute_ci"]["high"] - vs["absolute_ci"]["low"]) / (2 * stats.norm.ppf(0.975))
    close(se, absolute.uplift.stddev)
    close(relative_se(vs, 0.95), rel.uplift.stddev)
    close_ci(vs["sequential"]["absolute_ci"], *seq_abs.ci)
    close(vs["sequential"]["p_value"], seq_abs.p_value)
    close_ci(vs["sequential"]["relative_ci"], *seq_rel.ci)


@pytest.mark.parametrize(
    ("observed", "weights"),
    [([5100, 4900], [1, 1]), ([3300, 3400, 3300], [0.34, 0.33, 0.33]), ([900, 100, 140], [8, 1, 1])],
)
def test_srm_matches_gbstats(observed: list[int], weights: list[float]) -> None:
    close(srm_check(observed, weights)["p_value"], check_srm(observed, weights))
    assert not math.isnan(check_srm(observed, weights))
