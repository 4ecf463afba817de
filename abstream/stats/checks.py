"""Experiment-level checks: sample-ratio mismatch and Holm's multiple-comparison adjustment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats

from abstream.stats import models as m

SRM_THRESHOLD = 0.001


def srm_check(observed: Sequence[int], weights: Sequence[float]) -> dict[str, Any]:
    """Chi-square goodness of fit of the exposed users against the configured (relative) weights.

    A mismatch means the assignment or the exposure logging is broken, which biases every metric, so it is
    flagged at p < 0.001 (a strict threshold: the check runs on every experiment, every day). Variants with
    weight 0 are left out of the test; users in one of them is a mismatch by itself (chi2 is infinite there,
    reported as null with p = 0).
    """
    if len(observed) != len(weights) or not observed:
        raise ValueError("observed and weights must be non-empty and of the same length")
    if any(isinstance(o, bool) or int(o) != o or o < 0 for o in observed):
        raise ValueError(f"observed must be non-negative integers, not {list(observed)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all 0, not {list(weights)}")
    obs = [int(o) for o in observed]
    total = sum(obs)
    weight_sum = float(sum(weights))
    expected = [total * (w / weight_sum) for w in weights]
    out: dict[str, Any] = {
        "p_value": None,
        "chi2": None,
        "df": None,
        "flagged": False,
        "threshold": SRM_THRESHOLD,
        "expected": expected,
        "observed": obs,
        "reason": None,
    }
    live = [i for i, w in enumerate(weights) if w > 0]
    out["df"] = len(live) - 1
    if total == 0:
        out["reason"] = m.reason(m.SRM_NO_USERS, "No exposed users yet.")
        return out
    stray = [i for i, w in enumerate(weights) if w == 0 and obs[i] > 0]
    if stray:
        out.update(p_value=0.0, flagged=True)
        out["reason"] = m.reason(
            m.SRM_TRAFFIC_IN_ZERO_WEIGHT, f"Variants with weight 0 have exposed users (positions {stray})."
        )
        return out
    if len(live) < 2:
        out["reason"] = m.reason(m.SRM_SINGLE_VARIANT, "Only one variant has a positive weight: nothing to compare.")
        return out
    res = stats.chisquare([obs[i] for i in live], f_exp=[expected[i] for i in live])
    chi2, p = m.finite(res.statistic), m.finite(res.pvalue)
    out.update(chi2=chi2, p_value=p, flagged=p is not None and p < SRM_THRESHOLD)
    return out


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni step-down adjusted p-values (= statsmodels ``multipletests(method="holm")``).

    With m p-values sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)). ``None`` entries
    (comparisons that could not be tested) stay ``None`` and do not count in m. Controls the family-wise
    error rate under any dependence between the tests.
    """
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    for p, _ in present:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p-values must be in [0, 1], not {p}")
    out: list[float | None] = [None] * len(p_values)
    k = len(present)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (k - rank) * float(p)))
        out[i] = running
    return out
