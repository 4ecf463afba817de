"""Experiment results through the real path: users with known per-user values are posted over HTTP, go
through Kafka and the workers into the cumulative rollups, and every figure the results API answers is
compared with SciPy/statsmodels computed on the raw per-user values.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from abstream.config import Settings
from tests.stack import rows, wait_for
from tests.test_stream_workers import assert_verify_clean

REL = 1e-6


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def close(a: float | None, b: float) -> bool:
    return a is not None and (a == pytest.approx(b, rel=REL, abs=1e-12))


def send(base: str, user: str, names: list[str], when: datetime) -> None:
    events = [
        {"event_name": n, "occurred_at": iso(when + timedelta(seconds=i)), "event_id": uuid.uuid4().hex}
        for i, n in enumerate(names)
    ]
    if not events:
        return
    r = httpx.post(f"{base}/v1/events", json={"anonymous_user_id": user, "events": events}, timeout=15)
    assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text


def test_results_match_scipy_and_statsmodels_on_the_raw_per_user_values(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    rng = random.Random(20261204)
    body = {
        "test_name": f"checkout {uuid.uuid4().hex[:6]}",
        "variants": [{"variant_name": "control", "weight": 1}, {"variant_name": "treatment", "weight": 1}],
        "metrics": [
            {"key": "bought", "type": "proportion", "event": "purchase"},
            {"key": "views", "type": "count", "event": "page_view"},
            {"key": "revenue", "type": "sum", "tracked": "revenue"},
            {"key": "revenue_per_view", "type": "ratio", "numerator": "revenue", "denominator": "views"},
        ],
        "sequential_testing": True,
    }
    r = httpx.post(f"{base}/apiv1/ab-tests", json=body, timeout=15)
    assert r.status_code == 201, r.text
    test = r.json()
    test_id, key = test["id"], test["key"]

    now = datetime.now(UTC)
    before = now - timedelta(days=2)  # inside the 14-day CUPED lookback, before the exposure day
    per_user: dict[str, dict[str, Any]] = {}
    for i in range(160):
        user = f"r-{i}-{uuid.uuid4().hex[:6]}"
        pre_views = rng.randint(0, 6)
        send(base, user, ["page_view"] * pre_views, before)  # received before the assignment: covariate only
        a = httpx.post(f"{base}/apiv1/ab-tests/{test_id}/assign", json={"user_id": user}, timeout=10)
        assert a.status_code == 200 and a.json()["assigned"], a.text
        variant = a.json()["variant_key"]
        lift = 1 if variant == "B" else 0
        views = max(0, pre_views + rng.randint(-1, 2) + lift)
        bought = rng.random() < (0.35 if variant == "B" else 0.2)
        send(base, user, ["page_view"] * views + ["purchase"] * bought, datetime.now(UTC))
        revenue = 0.0
        if bought:
            for value in (round(rng.uniform(1, 50), 2), round(rng.uniform(1, 20), 2)):
                track = {"user_id": user, "metric_name": "revenue", "value": value}
                t = httpx.post(f"{base}/apiv1/ab-tests/{test_id}/track", json=track, timeout=10)
                assert t.status_code == 200, t.text
                revenue += value
        per_user[user] = {"variant": variant, "pre": pre_views, "views": views, "bought": int(bought), "rev": revenue}

    total_views = sum(u["views"] for u in per_user.values())

    def settled() -> bool:
        got = rows(settings, "SELECT sum(event_count) FROM experiment_source_rollups WHERE experiment_id = "
                             "{e:UInt32} AND source = 'event' AND name = 'page_view'", e=test_id)  # fmt: skip
        exposed = rows(settings, "SELECT sum(exposed_users) FROM experiment_exposed WHERE experiment_id = {e:UInt32}",
                       e=test_id)  # fmt: skip
        return got[0][0] == total_views and exposed[0][0] == len(per_user)

    wait_for(settled, timeout=90, what="the cumulative rollups to hold every user")
    wait_for(lambda: rows(settings, "SELECT sum(event_count) FROM experiment_source_rollups WHERE experiment_id = "
                                    "{e:UInt32} AND source = 'tracked'", e=test_id)[0][0]
             == 2 * sum(u["bought"] for u in per_user.values()), timeout=60, what="tracked values")  # fmt: skip

    res = httpx.get(f"{base}/apiv1/ab-tests/{key}/results", timeout=15)  # addressable by key too
    assert res.status_code == 200, res.text
    out = res.json()
    json.dumps(out, allow_nan=False)
    doc = httpx.get(f"{base}/openapi.json").json()
    op = doc["paths"]["/apiv1/ab-tests/{test_id}/results"]["get"]
    schema = {**op["responses"]["200"]["content"]["application/json"]["schema"], "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(out)
    assert {p["name"] for p in op["parameters"]} == {"test_id", "level", "metric"}
    assert out["test_id"] == test_id and out["sequential_testing"] is True
    assert out["exposure"]["rule"] == "first_assignment"
    assert out["data_freshness"]["latest_event_time"] is not None
    metrics = {m["key"]: m for m in out["metrics"]}
    assert list(metrics) == ["bought", "views", "revenue", "revenue_per_view"]

    def arrays(field: str, variant: str) -> np.ndarray:
        return np.array([u[field] for u in per_user.values() if u["variant"] == variant], dtype=float)

    n = {v: int(sum(1 for u in per_user.values() if u["variant"] == v)) for v in "AB"}
    assert {e["variant_key"]: e["exposed_users"] for e in out["variants"]} == n

    # proportions: two-proportion z (pooled) and the Wald CI of the difference, as statsmodels
    b0, b1 = arrays("bought", "A"), arrays("bought", "B")
    control, treat = metrics["bought"]["variants"]
    assert control["conversion_rate"] == pytest.approx(b0.mean(), rel=1e-12)
    c = treat["vs_control"]
    assert c["test"] == "two_proportion_z" and c["reason"] is None
    _, p = proportions_ztest([b1.sum(), b0.sum()], [len(b1), len(b0)])
    low, high = confint_proportions_2indep(b1.sum(), len(b1), b0.sum(), len(b0), method="wald", compare="diff")
    assert close(c["absolute_lift"], b1.mean() - b0.mean())
    assert close(c["p_value"], p)
    assert close(c["absolute_ci"]["low"], low) and close(c["absolute_ci"]["high"], high)

    # means (count of page views): Welch's t as SciPy, its CI as statsmodels
    for field, metric in (("views", "views"), ("rev", "revenue")):
        x0, x1 = arrays(field, "A"), arrays(field, "B")
        control, treat = metrics[metric]["variants"]
        assert close(control["mean"], x0.mean()) and close(control["std"], x0.std(ddof=1))
        assert close(treat["mean"], x1.mean()) and close(treat["std"], x1.std(ddof=1))
        c = treat["vs_control"]
        assert c["test"] == "welch_t"
        assert close(c["p_value"], stats.ttest_ind(x1, x0, equal_var=False).pvalue)
        low, high = CompareMeans(DescrStatsW(x1), DescrStatsW(x0)).tconfint_diff(alpha=0.05, usevar="unequal")
        assert close(c["absolute_ci"]["low"], low) and close(c["absolute_ci"]["high"], high)
        assert close(c["relative_lift"], x1.mean() / x0.mean() - 1)
        assert c["sequential"] is not None and c["sequential"]["absolute_ci"]["low"] < low  # always valid: wider
        assert 0 <= c["bayesian"]["chance_to_beat_control"] <= 1
        assert c["p_value_holm"] >= c["p_value"]

    # CUPED on views: the covariate (pre-exposure views) correlates, so the interval narrows
    c = metrics["views"]["variants"][1]["vs_control"]
    cuped = c["cuped"]
    assert cuped["variance_reduction"] > 0.3
    width = lambda ci: ci["high"] - ci["low"]  # noqa: E731
    assert width(cuped["absolute_ci"]) < width(c["absolute_ci"])
    y = np.array([u["pre"] for u in per_user.values()], dtype=float)
    x = np.array([u["views"] for u in per_user.values()], dtype=float)
    assert cuped["variance_reduction"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=0.1)

    # ratio: sum of revenue over sum of views per variant
    ratio = metrics["revenue_per_view"]["variants"]
    for entry, variant in zip(ratio, "AB", strict=True):
        assert close(entry["mean"], arrays("rev", variant).sum() / arrays("views", variant).sum())
    assert ratio[1]["vs_control"]["test"] == "delta_method_z"

    # SRM at 50/50 with random assignment: not flagged
    assert out["srm"]["flagged"] is False and out["srm"]["p_value"] > 0.001

    # the CLI prints exactly the API's body (--json) and a table
    env = {"CLICKHOUSE_URL": settings.clickhouse_url, "CLICKHOUSE_DATABASE": settings.clickhouse_database}
    cli = [sys.executable, "-m", "abstream.cli", "results", key]
    got = subprocess.run([*cli, "--json"], capture_output=True, text=True, env={**_env(), **env}, timeout=60)
    assert got.returncode == 0, got.stderr
    as_cli = json.loads(got.stdout)
    again = httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results", timeout=15).json()
    for body_ in (as_cli, again):
        body_.pop("query_ms")
        body_["data_freshness"].pop("age_seconds")
    assert as_cli == again
    table = subprocess.run(cli, capture_output=True, text=True, env={**_env(), **env, "COLUMNS": "160"}, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "revenue_per_view" in table.stdout and "│" in table.stdout

    # guard rails and parameters through HTTP
    assert httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results?level=0.5").json()["error"]["code"] == (
        "invalid_parameter"
    )
    assert httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results?level=99").json()["level"] == 0.99
    assert httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results?metric=nope").status_code == 404
    one = httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results?metric=views").json()
    assert [m["key"] for m in one["metrics"]] == ["views"]
    full = {m["key"]: m for m in again["metrics"]}
    holm = full["views"]["variants"][1]["vs_control"]["p_value_holm"]
    assert one["metrics"][0]["variants"][1]["vs_control"]["p_value_holm"] == holm, "Holm does not depend on the view"
    assert one["multiple_testing"] == again["multiple_testing"]
    assert_verify_clean(settings)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_an_edit_of_the_analysis_rules_recomputes_the_rollups(stack: tuple[Settings, str]) -> None:
    """PATCH adds a ratio metric and an exposure event to a running experiment: the workers re-read the registry,
    re-contribute its users, and the rollups equal the from-scratch recomputation under the new rules."""
    settings, base = stack
    r = httpx.post(f"{base}/apiv1/ab-tests", json={
        "test_name": f"edit {uuid.uuid4().hex[:6]}",
        "variants": [{"variant_name": "a"}, {"variant_name": "b"}],
        "metrics": [{"key": "views", "type": "count", "event": "page_view"},
                    {"key": "buys", "type": "count", "event": "purchase"}],
    }, timeout=15)  # fmt: skip
    assert r.status_code == 201, r.text
    test_id = r.json()["id"]
    now = datetime.now(UTC)
    users = [f"e-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    for i, user in enumerate(users):
        assert httpx.post(f"{base}/apiv1/ab-tests/{test_id}/assign", json={"user_id": user}).status_code == 200
        names = ["page_view", "purchase"] + (["checkout_seen", "purchase"] if i % 2 else [])
        send(base, user, names, now)
    count_sql = ("SELECT sum(event_count) FROM experiment_source_rollups WHERE experiment_id = {e:UInt32} "
                 "AND name = 'purchase'")  # fmt: skip
    wait_for(lambda: rows(settings, count_sql, e=test_id)[0][0] == 18, timeout=60, what="purchases")
    patch = {"metrics": [{"key": "views", "type": "count", "event": "page_view"},
                         {"key": "buys", "type": "count", "event": "purchase"},
                         {"key": "buys_per_view", "type": "ratio", "numerator": "buys", "denominator": "views"}],
             "exposure_event": "checkout_seen"}  # fmt: skip
    r = httpx.patch(f"{base}/apiv1/ab-tests/{test_id}", json=patch, timeout=15)
    assert r.status_code == 200, r.text
    # exposed now: only the six users with checkout_seen, counting their purchase after it (one each)
    exposed_sql = "SELECT sum(exposed_users) FROM experiment_exposed WHERE experiment_id = {e:UInt32}"
    wait_for(lambda: rows(settings, exposed_sql, e=test_id)[0][0] == 6, timeout=60, what="the new exposure rule")
    wait_for(lambda: rows(settings, count_sql, e=test_id)[0][0] == 6, timeout=30, what="purchases after exposure")
    ratio_sql = "SELECT sum(sum_x), sum(sum_y) FROM experiment_ratio_rollups WHERE experiment_id = {e:UInt32}"
    wait_for(lambda: rows(settings, ratio_sql, e=test_id) == [(6.0, 0.0)], timeout=30, what="the ratio rollups")
    body = httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results", timeout=15).json()
    assert body["exposure"] == {
        "rule": "exposure_event",
        "event": "checkout_seen",
        "description": "users count from their first 'checkout_seen' event after assignment",
    }
    assert [m["key"] for m in body["metrics"]] == ["views", "buys", "buys_per_view"]
    assert_verify_clean(settings)
    # null takes the exposure rule back to the first assignment: every assigned user again
    r = httpx.patch(f"{base}/apiv1/ab-tests/{test_id}", json={"exposure_event": None}, timeout=15)
    assert r.status_code == 200 and r.json()["exposure_event"] is None, r.text
    wait_for(lambda: rows(settings, exposed_sql, e=test_id)[0][0] == 12, timeout=60, what="the first-assignment rule")
    assert_verify_clean(settings)
