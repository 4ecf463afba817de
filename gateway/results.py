"""GET /apiv1/ab-tests/{test_id}/results: per variant, exposures and every metric, read from ClickHouse.

Exposed users come from `assignments` (each user's first assignment, current phase). Metric figures
come from the enriched raw log (`event_logs FINAL`), grouped by the variant each event was attributed
to: users with the metric, events, and the sum of tracked values.
Each non-control variant is compared with the control (the first variant) on the share of exposed
users with the metric: a two-sided two-proportion z-test (SciPy), with the difference and its 95%
confidence interval. The gateway only reads ClickHouse here; it never writes it.
"""

from __future__ import annotations

import math
from typing import Any

from scipy.stats import norm

from abstream.clickhouse import async_client
from abstream.config import Settings
from schemas.errors import ApiError
from schemas.experiments import Experiment

EXPOSURES_SQL = (
    "SELECT variant_id, count() FROM assignments FINAL "
    "WHERE experiment_id = {experiment_id:UInt32} AND phase = {phase:UInt32} GROUP BY variant_id"
)
METRICS_SQL = (
    "SELECT experiment_map[{key:String}] AS variant_key, event_name, uniqExact(user_id), count(), "
    "sum(ifNull(metric_value, 0)), max(kind = 'metric') FROM event_logs FINAL "
    "WHERE mapContains(experiment_map, {key:String}) "
    "AND (kind = 'event' OR experiment_id = {experiment_id:UInt32}) "
    "GROUP BY variant_key, event_name"
)


def compare(control_users: int, control_n: int, users: int, n: int) -> dict[str, float | None]:
    """Two-proportion z-test of users/n against control_users/control_n."""
    if not n or not control_n:
        return {"difference": None, "ci95_low": None, "ci95_high": None, "p_value": None}
    p1, p0 = users / n, control_users / control_n
    diff = p1 - p0
    pooled = (users + control_users) / (n + control_n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / control_n))
    se = math.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / control_n)
    p_value = float(2 * norm.sf(abs(diff) / se_pooled)) if se_pooled > 0 else None
    z = float(norm.ppf(0.975))
    return {"difference": diff, "ci95_low": diff - z * se, "ci95_high": diff + z * se, "p_value": p_value}


async def experiment_results(settings: Settings, experiment: Experiment) -> dict[str, Any]:
    try:
        client = await async_client(settings)
        try:
            params = {"experiment_id": experiment.id, "phase": experiment.phase, "key": experiment.key}
            exposures = dict((await client.query(EXPOSURES_SQL, parameters=params)).result_rows)
            metric_rows = (await client.query(METRICS_SQL, parameters=params)).result_rows
        finally:
            await client.close()
    except Exception as exc:  # noqa: BLE001 - any ClickHouse failure is a clear 503, not a 500
        raise ApiError(
            503, "results_unavailable", f"ClickHouse could not be read: {exc}", headers={"Retry-After": "5"}
        ) from exc
    by_key = {v.key: v for v in experiment.variants}
    metrics: dict[str, dict[int, tuple[int, int, float]]] = {}
    tracked: set[str] = set()
    for variant_key, name, users, count, total, is_metric in metric_rows:
        variant = by_key.get(variant_key)
        if variant is not None:
            metrics.setdefault(name, {})[variant.variant_id] = (int(users), int(count), float(total))
            if is_metric:
                tracked.add(name)
    control = experiment.variants[0]
    control_n = int(exposures.get(control.variant_id, 0))
    variants = []
    for variant in experiment.variants:
        n = int(exposures.get(variant.variant_id, 0))
        variant_metrics = {}
        for name, per_variant in sorted(metrics.items()):
            users, count, total = per_variant.get(variant.variant_id, (0, 0, 0.0))
            entry: dict[str, Any] = {
                "users": users,
                "events": count,
                "value_sum": total,
                "conversion_rate": users / n if n else None,
                "kind": "tracked" if name in tracked else "event",
                "mean_per_exposed_user": (total if name in tracked else count) / n if n else None,
            }
            if variant is not control:
                c_users = per_variant.get(control.variant_id, (0, 0, 0.0))[0]
                entry["vs_control"] = compare(c_users, control_n, users, n)
            variant_metrics[name] = entry
        variants.append({
            "variant_id": variant.variant_id, "variant_name": variant.name, "variant_key": variant.key,
            "is_control": variant is control, "exposed_users": n, "metrics": variant_metrics,
        })  # fmt: skip
    return {
        "test_id": experiment.id,
        "test_name": experiment.name,
        "status": experiment.status.value,
        "phase": experiment.phase,
        "control_variant_id": control.variant_id,
        "total_exposed_users": sum(int(v) for v in exposures.values()),
        "variants": variants,
    }
