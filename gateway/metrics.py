"""The Calicritters metrics API (/v1/metrics/*), read from the rollups with parameterised SQL.

* summary (public): events, active users, rejections today / 7 / 30 days, running experiments with
  their exposed users, freshness. Aggregates only: no user id ever leaves here.
* daily: per day, event name, platform and app version: events and unique users (daily rollups).
* experiments: per experiment and variant, exposures per day and to date, and the results core's
  figures for every metric (gateway.results, one query for all experiments).
* funnels: per funnel of tests.json, per step users and conversion (Wilson 95%); per variant inside an
  experiment, each step compared with the control.

Every read is a few small queries over rollups, whatever the number of events; "today" is the UTC day.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from abstream.stats.proportions import compare_rates, rate
from gateway.results import (
    FRESHNESS_STATS,
    RollupReader,
    compute_results,
    fetch_rollups,
    iso_ms,
    store_unavailable,
)
from schemas.errors import ApiError
from schemas.experiments import Experiment, Funnel, Status, load_manifest
from schemas.metrics import DEFAULT_DAILY_SPAN_DAYS, FIRST_DAY, MAX_DAILY_SPAN_DAYS, DailyQuery, parse_day

log = logging.getLogger(__name__)

SUMMARY_SQL = (
    """
SELECT 'events' AS kind, 0 AS a, 0 AS b, 0 AS c,
       [toFloat64(sumIf(events, day >= {today:Date})), toFloat64(sumIf(events, day >= {week:Date})),
        toFloat64(sum(events))] AS v
FROM daily_metric_rollups_by_partition FINAL
WHERE day >= {month:Date} AND platform = '*' AND app_version = '*'
UNION ALL
SELECT 'users', 0, 0, 0, [toFloat64(sumIf(users, day >= {today:Date})), toFloat64(sumIf(users, day >= {week:Date})),
                          toFloat64(sum(users))]
FROM user_last_active_by_partition FINAL WHERE day >= {month:Date}
UNION ALL
SELECT concat('rejected_', scope), 0, 0, 0,
       [toFloat64(countIf(received_at >= {today_t:DateTime64(3, 'UTC')})),
        toFloat64(countIf(received_at >= {week_t:DateTime64(3, 'UTC')})), toFloat64(count())]
FROM rejected_events WHERE received_at >= {month_t:DateTime64(3, 'UTC')} GROUP BY scope
UNION ALL
SELECT 'exposed', experiment_id, phase, variant_id, [toFloat64(sum(users))]
FROM experiment_exposed_by_partition FINAL WHERE experiment_id IN {ids:Array(UInt32)}
GROUP BY experiment_id, phase, variant_id
UNION ALL
SELECT 'fresh', 0, 0, 0, """
    + FRESHNESS_STATS
    + "\n"
)

DAILY_SQL = """
SELECT day, event_name, platform, app_version, sum(events) AS events, sum(unique_users) AS unique_users
FROM daily_metric_rollups_by_partition FINAL
WHERE day >= {from:Date} AND day <= {to:Date}
  AND ({event_name:Nullable(String)} IS NULL OR event_name = {event_name:Nullable(String)})
  AND ({platform:Nullable(String)} IS NULL OR platform = {platform:Nullable(String)})
  AND ({app_version:Nullable(String)} IS NULL OR app_version = {app_version:Nullable(String)})
GROUP BY day, event_name, platform, app_version
HAVING events > 0
ORDER BY day, event_name, platform, app_version
"""

FUNNELS_SQL = """
SELECT funnel_key, experiment_id, variant_id, step, sum(users) AS users
FROM funnel_rollups_by_partition FINAL
WHERE funnel_key IN {funnels:Array(String)} AND experiment_id IN {ids:Array(UInt32)}
GROUP BY funnel_key, experiment_id, variant_id, step
"""


async def _query(reader: RollupReader, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    try:
        return await reader.query(sql, params)
    except Exception as exc:  # noqa: BLE001 - any ClickHouse failure is a 503 with Retry-After, never a 500
        raise store_unavailable(reader.settings, exc, "metrics") from None


def _today() -> date:
    return datetime.now(UTC).date()


# ---- summary --------------------------------------------------------------------------------------------------


async def summary(reader: RollupReader, experiments: Sequence[Experiment]) -> dict[str, Any]:
    today = _today()
    week, month = today - timedelta(days=6), today - timedelta(days=29)
    running = [e for e in experiments if e.status == Status.RUNNING]

    def midnight(d: date) -> datetime:
        return datetime(d.year, d.month, d.day, tzinfo=UTC)

    params = {
        "today": today, "week": week, "month": month, "today_t": midnight(today), "week_t": midnight(week),
        "month_t": midnight(month), "ids": [e.id for e in running],
    }  # fmt: skip
    branches = SUMMARY_SQL.split("UNION ALL")
    halves = ["UNION ALL".join(branches[:2]), "UNION ALL".join(branches[2:])]  # run side by side
    rows = [row for part in await asyncio.gather(*(_query(reader, sql, params) for sql in halves)) for row in part]
    windows: dict[str, list[float]] = {}
    exposed: dict[tuple[int, int], dict[int, int]] = {}
    fresh = [-1.0, -1.0]
    for kind, a, b, c, values in rows:
        if kind == "exposed":
            exposed.setdefault((int(a), int(b)), {})[int(c)] = int(values[0])
        elif kind == "fresh":
            fresh = list(values)
        else:
            windows[kind] = list(values)

    def windowed(kind: str) -> dict[str, int]:
        t, w, m = windows.get(kind, [0.0, 0.0, 0.0])
        return {"today": int(t), "last_7_days": int(w), "last_30_days": int(m)}

    out_running = []
    for e in running:
        per_variant = exposed.get((e.id, e.phase), {})
        variants = {v.key: per_variant.get(v.variant_id, 0) for v in e.variants}
        out_running.append({"experiment_id": e.id, "key": e.key, "name": e.name,
                            "exposed_users": sum(variants.values()), "variants": variants})  # fmt: skip
    return {
        "generated_at": iso_ms(time.time_ns() // 1_000_000),
        "events": windowed("events"),
        "active_users": windowed("users"),
        "rejected_events": windowed("rejected_event"),
        "refused_requests": windowed("rejected_request"),
        "running_experiments": out_running,
        "latest_event_time": iso_ms(int(fresh[0]) if fresh[0] >= 0 else None),
        "rollups_updated_at": iso_ms(int(fresh[1]) if fresh[1] >= 0 else None),
    }


# ---- daily ----------------------------------------------------------------------------------------------------


def _bad(field: str, code: str, message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", message, [{"field": field, "code": code, "message": message}])


async def daily(reader: RollupReader, query: DailyQuery) -> dict[str, Any]:
    try:
        to = parse_day(query.to, "to") or _today()
        start = parse_day(query.from_, "from")
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise _bad(name, "invalid_date", str(exc)) from None
    if start is None:
        start = max(FIRST_DAY, to - timedelta(days=DEFAULT_DAILY_SPAN_DAYS - 1))
    if start > to:
        raise _bad("from", "invalid_range", f"from ({start}) is after to ({to})")
    if (to - start).days + 1 > MAX_DAILY_SPAN_DAYS:
        raise _bad("from", "range_too_long", f"at most {MAX_DAILY_SPAN_DAYS} days from `from` to `to` "
                   f"(`to` defaults to today): {start}..{to} is {(to - start).days + 1}")  # fmt: skip
    platform = None if query.platform is None else ("" if query.platform == "unknown" else query.platform)
    rows = await _query(reader, DAILY_SQL, {
        "from": start, "to": to, "event_name": query.event_name, "platform": platform,
        "app_version": query.app_version,
    })  # fmt: skip
    filtered = query.platform is not None or query.app_version is not None
    detail, totals = [], []
    for day, name, plat, version, events, users in rows:
        if plat == "*":
            if not filtered:
                totals.append({"day": day.isoformat(), "event_name": name, "events": int(events),
                               "unique_users": int(users)})  # fmt: skip
        else:
            detail.append({"day": day.isoformat(), "event_name": name, "platform": plat, "app_version": version,
                           "events": int(events), "unique_users": int(users)})  # fmt: skip
    return {"from": start.isoformat(), "to": to.isoformat(), "rows": detail, "totals": None if filtered else totals}


# ---- experiments ----------------------------------------------------------------------------------------------


async def experiments_metrics(reader: RollupReader, experiments: Sequence[Experiment], level: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not experiments:
        return {"experiments": []}
    rollups, fresh = await fetch_rollups(reader, experiments, exposures_by_day=True)
    out = []
    for e in experiments:
        body = compute_results(e, rollups[e.id], fresh, level, started=t0)
        exposures = [
            {"variant_id": v.variant_id, "variant_key": v.key, "to_date": rollups[e.id].exposed.get(v.variant_id, 0),
             "by_day": [{"day": day, "users": n} for day, n in sorted(rollups[e.id].by_day.get(v.variant_id, []))
                        if n > 0]}
            for v in e.variants
        ]  # fmt: skip
        out.append({"experiment_id": e.id, "key": e.key, "name": e.name, "status": e.status.value,
                    "exposures": exposures, "results": body})  # fmt: skip
    return {"experiments": out}


# ---- funnels --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def manifest_funnels(path: str) -> tuple[Funnel, ...]:
    """tests.json's funnels (the workers count these; the gateway reads the same file)."""
    return tuple(load_manifest(path).funnels)


def _steps(names: Sequence[str], users: dict[int, int]) -> list[dict[str, Any]]:
    first = users.get(1, 0)
    out = []
    for i, name in enumerate(names, start=1):
        n = users.get(i, 0)
        out.append({
            "step": i, "name": name, "users": n,
            "from_previous": rate(n, users.get(i - 1, 0)) if i > 1 else rate(n, n),
            "from_first": rate(n, first),
        })  # fmt: skip
    return out


async def funnels(
    reader: RollupReader, funnel_defs: Sequence[Funnel], experiment: Experiment | None, known: Sequence[Experiment]
) -> dict[str, Any]:
    by_key = {e.key: e for e in known}
    plan: list[tuple[Funnel, list[Experiment]]] = []
    for f in funnel_defs:
        if experiment is not None:
            if f.experiment_keys and experiment.key not in f.experiment_keys:
                continue  # this funnel is not broken down by that experiment
            exps = [experiment]
        else:
            exps = [by_key[k] for k in f.experiment_keys or () if k in by_key]
        plan.append((f, exps))
    ids = sorted({0, *(e.id for _, exps in plan for e in exps)})
    rows = await _query(reader, FUNNELS_SQL, {"funnels": [f.key for f, _ in plan], "ids": ids})
    counts: dict[tuple[str, int, int], dict[int, int]] = {}
    for funnel_key, experiment_id, variant_id, step, users in rows:
        counts.setdefault((funnel_key, int(experiment_id), int(variant_id)), {})[int(step)] = int(users)
    out = []
    for f, exps in plan:
        breakdown = []
        for e in exps:
            control = e.control
            control_users = counts.get((f.key, e.id, control.variant_id), {})
            variants = []
            for v in e.variants:
                users = counts.get((f.key, e.id, v.variant_id), {})
                steps = _steps(f.steps, users)
                if v is not control:
                    c_first, v_first = control_users.get(1, 0), users.get(1, 0)
                    for s in steps:
                        s["vs_control"] = compare_rates(control_users.get(s["step"], 0), c_first, s["users"], v_first)
                variants.append({"variant_id": v.variant_id, "variant_key": v.key, "is_control": v is control,
                                 "steps": steps})  # fmt: skip
            breakdown.append({"experiment_id": e.id, "key": e.key, "variants": variants})
        out.append({
            "key": f.key, "name": f.name, "steps": list(f.steps),
            "conversion_window_seconds": f.conversion_window_seconds,
            "overall": _steps(f.steps, counts.get((f.key, 0, 0), {})), "experiments": breakdown,
        })  # fmt: skip
    return {"funnels": out}


__all__ = ["daily", "experiments_metrics", "funnels", "manifest_funnels", "summary"]
