"""Experiment results: the cumulative rollups of one experiment turned into statistics.

Read path only (the gateway never writes ClickHouse). Three small parameterised queries over the
``*_by_partition`` tables of clickhouse/0008 (a few rows per variant and source, whatever the number of
events), then the statistics core (abstream.stats) per metric, Holm across every comparison, SRM across
variants and the rollups' freshness. The ArkForge route, the metrics API and ``abstream results`` all
call ``experiment_results``; docs/statistics.md says which formula each figure uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from clickhouse_connect.driver.asyncclient import AsyncClient

from abstream.clickhouse import async_client, describe_failure
from abstream.config import Settings
from abstream.stats import AnalysisOptions, VariantMoments, analyze_metric, holm_adjust, srm_check
from schemas.analysis import MetricDefinition, SourceKind, default_metrics
from schemas.errors import ApiError
from schemas.experiments import Experiment

log = logging.getLogger(__name__)


FRESHNESS_STATS = """[toFloat64(if(count() = 0, -1, ifNull(toUnixTimestamp64Milli(max(watermark)), -1))),
        toFloat64(if(count() = 0, -1, toUnixTimestamp64Milli(max(run_at))))] AS stats
FROM (SELECT watermark, run_at FROM rollup_runs ORDER BY run_at DESC LIMIT 500)"""
"""[latest watermark, latest flush] in epoch ms (-1: none yet) over the latest flushes: the rollups' freshness."""

ROLLUP_BRANCHES = {
    "x": """SELECT 'x' AS kind, experiment_id, phase, variant_id, '' AS source, '' AS name,
       [toFloat64(sum(users))] AS stats
FROM experiment_exposed_by_partition FINAL WHERE experiment_id IN {ids:Array(UInt32)}
GROUP BY experiment_id, phase, variant_id""",
    "c": """SELECT 'c' AS kind, experiment_id, phase, variant_id, source, name,
       [toFloat64(sum(users_with_metric)), toFloat64(sum(event_count)), sum(sum_x), sum(sum_x2),
        toFloat64(sum(users_with_pre)), sum(sum_y), sum(sum_y2), sum(sum_xy), toFloat64(sum(users_with_both)),
        toFloat64(sum(users_nonzero))] AS stats
FROM experiment_source_rollups_by_partition FINAL WHERE experiment_id IN {ids:Array(UInt32)}
GROUP BY experiment_id, phase, variant_id, source, name""",
    "r": """SELECT 'r' AS kind, experiment_id, phase, variant_id, '' AS source, metric AS name,
       [sum(sum_x), sum(sum_x2), sum(sum_y), sum(sum_y2), sum(sum_xy)] AS stats
FROM experiment_ratio_rollups_by_partition FINAL WHERE experiment_id IN {ids:Array(UInt32)}
GROUP BY experiment_id, phase, variant_id, metric""",
    "f": f"""SELECT 'f' AS kind, 0 AS experiment_id, 0 AS phase, 0 AS variant_id, '' AS source, '' AS name,
       {FRESHNESS_STATS}""",
    "d": """SELECT 'd' AS kind, experiment_id, phase, variant_id, '' AS source, toString(day) AS name,
       [toFloat64(sum(users))] AS stats
FROM experiment_exposed_daily_by_partition FINAL WHERE experiment_id IN {ids:Array(UInt32)}
GROUP BY experiment_id, phase, variant_id, day""",
}
"""What results read, as (kind, experiment_id, phase, variant_id, source, name, stats) rows: exposed users (x),
per-source sums (c), ratio sums (r), the rollups' freshness (f) and, for the metrics API, exposed users per
variant and UTC day of their exposure (d). All phases are read; the caller keeps the current one. A few rows per
variant and source, whatever the number of events."""


def rollup_queries(kinds: Sequence[str]) -> list[str]:
    """The branches as two queries run side by side: the source sums, and the rest (on the embedded endpoint
    each query costs ~5 ms of fixed overhead, and it serves two at once)."""
    heavy = [ROLLUP_BRANCHES[k] for k in kinds if k == "c"]
    light = [ROLLUP_BRANCHES[k] for k in kinds if k != "c"]
    return ["\nUNION ALL\n".join(part) for part in (heavy, light) if part]


SourceRow = tuple[float, ...]
"""users_with_metric, event_count, sum_x, sum_x2, users_with_pre, sum_y, sum_y2, sum_xy, users_with_both,
users_nonzero"""


@dataclass
class ExperimentRollups:
    """One experiment phase's cumulative rollups, as read."""

    exposed: dict[int, int] = field(default_factory=dict)  # variant_id -> exposed users
    by_day: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # variant_id -> (day, users first assigned)
    sources: dict[tuple[str, str], dict[int, SourceRow]] = field(default_factory=dict)  # (kind, name) -> variant
    ratios: dict[str, dict[int, tuple[float, ...]]] = field(default_factory=dict)  # metric key -> variant


@dataclass
class Freshness:
    watermark_ms: int | None = None  # the latest event time the rollups include
    run_at_ms: int | None = None  # the latest flush of rollups


async def fetch_rollups(
    reader: RollupReader, experiments: Sequence[Experiment], exposures_by_day: bool = False
) -> tuple[dict[int, ExperimentRollups], Freshness]:
    """The current phase's rollups of each experiment, and the rollups' freshness (one query)."""
    phases = {e.id: e.phase for e in experiments}
    kinds = ["x", "c", "f"]
    if any(m.type == "ratio" for e in experiments for m in e.metrics or ()):
        kinds.append("r")
    if exposures_by_day:
        kinds.append("d")
    params = {"ids": sorted(phases)}
    try:
        answers = await asyncio.gather(*(reader.query(sql, params) for sql in rollup_queries(kinds)))
        rows = [row for answer in answers for row in answer]
    except Exception as exc:  # noqa: BLE001 - any ClickHouse failure is a clear 503, never a 500 or its text
        raise store_unavailable(reader.settings, exc, "results") from None
    out = {experiment_id: ExperimentRollups() for experiment_id in phases}
    fresh = Freshness()
    for kind, experiment_id, phase, variant_id, source, name, stats in rows:
        if kind == "f":
            watermark, run_at = (int(v) for v in stats)
            fresh = Freshness(watermark if watermark >= 0 else None, run_at if run_at >= 0 else None)
            continue
        if phases.get(experiment_id) != phase:
            continue
        if kind == "d":
            out[experiment_id].by_day.setdefault(int(variant_id), []).append((name, int(stats[0])))
            continue
        target = out[experiment_id]
        if kind == "x":
            target.exposed[int(variant_id)] = int(stats[0])
        elif kind == "c":
            target.sources.setdefault((source, name), {})[int(variant_id)] = tuple(stats)
        else:
            target.ratios.setdefault(name, {})[int(variant_id)] = tuple(stats)
    return out, fresh


READ_SETTINGS = {"max_threads": 1}
"""Rollup reads touch a few thousand rows: one thread answers them as fast as a pool and without its tail
(measured on the embedded endpoint: p50 the same, max 33 ms instead of 129 ms over 30 reads)."""


class RollupReader:
    """One shared ClickHouse client for the read path (a new client costs three queries of its own)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await async_client(self.settings)
        try:
            result = await self._client.query(sql, parameters=params, settings=READ_SETTINGS)
            return list(result.result_rows)
        except Exception:
            client, self._client = self._client, None  # reconnect next time
            if client is not None:
                await client.close()
            raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


LEVEL_VALUES = {"0.9": 0.90, "0.90": 0.90, "0.95": 0.95, "0.99": 0.99, "90": 0.90, "95": 0.95, "99": 0.99}


def parse_level(value: str | None) -> float:
    """The ``level`` parameter: 0.90, 0.95 (default) or 0.99, also written 90, 95, 99; nothing else."""
    if value is None:
        return 0.95
    level = LEVEL_VALUES.get(value)
    if level is None:
        message = f"level must be one of 0.90, 0.95, 0.99 (or 90, 95, 99), got {value!r}"
        raise ApiError(400, "invalid_parameter", message, [{"field": "level", "code": "invalid_level",
                                                            "message": message}])  # fmt: skip
    return level


def store_unavailable(settings: Settings, exc: BaseException, what: str) -> ApiError:
    """503 ``{what}_unavailable`` with Retry-After for a failed rollup read; the cause is logged, never sent."""
    log.warning("%s unavailable: %s", what, describe_failure(settings, exc))
    return ApiError(
        503, f"{what}_unavailable", f"the {what} store (ClickHouse) cannot be read; retry shortly",
        headers={"Retry-After": "5"},
    )  # fmt: skip


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as an ISO 8601 UTC time with milliseconds."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _moments(metric: MetricDefinition, variant_key: str, n: int, row: SourceRow | None, cuped: bool) -> VariantMoments:
    """A variant's sufficient statistics of one (non-ratio) metric's per-user value x (and covariate y)."""
    wm, count, sx, sx2, wp, sy, sy2, sxy, wb, nz = row or (0, 0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0, 0)
    # the exposure and source rows of a partition are written one after the other: a reader between the two
    # can see a user's metric before the user's exposure, never the reverse for long; clamp to what is exposed
    wm, wp, wb, nz = min(int(wm), n), min(int(wp), n), min(int(wb), n), min(int(nz), n)
    if metric.type == "proportion":
        with_metric = wm  # users with the source at least once: their x is 1
        x, x2, y, y2, xy = float(wm), float(wm), float(wp), float(wp), float(wb)
    else:
        with_metric = nz  # users whose value is not 0 (a user who tracked 0.0 is not a conversion)
        x, x2, y, y2, xy = float(sx), float(sx2), float(sy), float(sy2), float(sxy)
    if not cuped:
        return VariantMoments(variant_key, n, with_metric, x, x2)
    return VariantMoments(variant_key, n, with_metric, x, x2, y, y2, xy)


async def experiment_results(
    reader: RollupReader, experiment: Experiment, level: float = 0.95, metric_key: str | None = None
) -> dict[str, Any]:
    """The results body of one experiment (its current phase) from the cumulative rollups."""
    t0 = time.perf_counter()
    rollups, fresh = await fetch_rollups(reader, [experiment])
    return compute_results(experiment, rollups[experiment.id], fresh, level, metric_key, t0)


def compute_results(
    experiment: Experiment,
    rollups: ExperimentRollups,
    fresh: Freshness,
    level: float = 0.95,
    metric_key: str | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """The results body from rollups already read (404 ``metric_not_found`` for an unknown ``metric_key``)."""
    t0 = time.perf_counter() if started is None else started
    exposed, sources, ratios = rollups.exposed, rollups.sources, rollups.ratios
    metrics = list(experiment.metrics) if experiment.metrics else _observed_defaults(sources)
    if metric_key is not None and all(m.key != metric_key for m in metrics):
        known = ", ".join(m.key for m in metrics) or "none yet"
        raise ApiError(404, "metric_not_found", f"no metric {metric_key!r} in this experiment (metrics: {known})")

    control = experiment.control
    options = AnalysisOptions(level=level, sequential=experiment.sequential_testing)
    cuped = experiment.cuped_lookback_days > 0
    by_key = {m.key: m for m in experiment.metrics or ()}
    out_metrics = []
    for metric in metrics:
        if metric.type == "ratio":
            rows = ratios.get(metric.key, {})
            numerator = by_key.get(metric.numerator or "")
            num_rows = sources.get(numerator.source, {}) if numerator is not None else {}
            moments = [
                VariantMoments(
                    v.key,
                    exposed.get(v.variant_id, 0),
                    int((num_rows.get(v.variant_id) or (0,))[0]),
                    *(rows.get(v.variant_id) or (0.0, 0.0, 0.0, 0.0, 0.0)),
                )  # fmt: skip
                for v in experiment.variants
            ]
            analysed = _analyze("ratio", moments, control.key, options)
        else:
            rows_by_variant = sources.get(metric.source, {})
            moments = [
                _moments(metric, v.key, exposed.get(v.variant_id, 0), rows_by_variant.get(v.variant_id), cuped)
                for v in experiment.variants
            ]
            analysed = _analyze("proportion" if metric.type == "proportion" else "mean", moments, control.key, options)
        for variant, entry in zip(experiment.variants, analysed, strict=True):
            entry["variant_id"] = variant.variant_id
        out_metrics.append({
            "key": metric.key, "name": metric.label, "type": metric.type,
            "source": None if metric.type == "ratio" else {"kind": metric.source[0], "name": metric.source[1]},
            "numerator": metric.numerator, "denominator": metric.denominator, "variants": analysed,
        })  # fmt: skip
    _holm(out_metrics)  # across every metric, also when one is asked for: the adjustment must not depend on the view
    comparisons = _count_p(out_metrics)
    if metric_key is not None:
        out_metrics = [m for m in out_metrics if m["key"] == metric_key]

    counts = [exposed.get(v.variant_id, 0) for v in experiment.variants]
    srm = srm_check(counts, [v.weight for v in experiment.variants])
    age = None if fresh.run_at_ms is None else max(0.0, time.time() - fresh.run_at_ms / 1000)
    return {
        "test_id": experiment.id,
        "test_key": experiment.key,
        "test_name": experiment.name,
        "status": experiment.status.value,
        "phase": experiment.phase,
        "control_variant_id": control.variant_id,
        "control_variant_key": control.key,
        "total_exposed_users": sum(counts),
        "exposure": {
            "rule": "first_assignment" if experiment.exposure_event is None else "exposure_event",
            "event": experiment.exposure_event,
            "description": "users count from their first assignment in this phase"
            if experiment.exposure_event is None
            else f"users count from their first {experiment.exposure_event!r} event after assignment",
        },
        "level": level,
        "sequential_testing": experiment.sequential_testing,
        "cuped_lookback_days": experiment.cuped_lookback_days,
        "multiple_testing": {"method": "holm", "comparisons": comparisons},
        "srm": srm,
        "data_freshness": {
            "latest_event_time": iso_ms(fresh.watermark_ms),
            "rollups_updated_at": iso_ms(fresh.run_at_ms),
            "age_seconds": None if age is None else round(age, 3),
        },
        "variants": [
            {"variant_id": v.variant_id, "variant_key": v.key, "variant_name": v.name, "is_control": v is control,
             "weight": v.weight / sum(w.weight for w in experiment.variants), "exposed_users": c}
            for v, c in zip(experiment.variants, counts, strict=True)
        ],
        "metrics": out_metrics,
        "query_ms": round((time.perf_counter() - t0) * 1000, 3),
    }  # fmt: skip


def _analyze(
    metric_type: Literal["proportion", "mean", "ratio"],
    moments: list[VariantMoments],
    control_key: str,
    options: AnalysisOptions,
) -> list[dict[str, Any]]:
    """analyze_metric, or for sums it refuses (say a non-finite one a bypassing writer left) entries that
    say why instead of a 500."""
    try:
        return analyze_metric(metric_type, moments, control_key, options)
    except ValueError as exc:
        log.error("results: rollups not analysable (%s): %s", metric_type, exc)
        reason = {"code": "inconsistent_rollups", "message": "the rollups of this metric cannot be analysed"}
        return [
            {"variant_key": v.key, "is_control": v.key == control_key, "exposed_users": v.n,
             "users_with_metric": v.users_with_metric, "mean": None, "std": None, "conversion_rate": None,
             "numerator_mean": None, "denominator_mean": None,
             "vs_control": None if v.key == control_key else {"reason": reason}}
            for v in moments
        ]  # fmt: skip


def _observed_defaults(sources: dict[tuple[str, str], Any]) -> list[MetricDefinition]:
    kinds: list[tuple[SourceKind, str]] = [
        ("event" if kind == "event" else "tracked", name) for kind, name in sorted(sources, key=lambda s: (s[0], s[1]))
    ]
    return default_metrics(kinds)


def _comparisons(out_metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["vs_control"] for m in out_metrics for e in m["variants"] if e.get("vs_control") is not None]


def _count_p(out_metrics: list[dict[str, Any]]) -> int:
    return sum(1 for c in _comparisons(out_metrics) if c.get("p_value") is not None)


def _holm(out_metrics: list[dict[str, Any]]) -> None:
    """Holm-adjusted p-values across every variant and metric, beside the raw ones (``p_value_holm``)."""
    comparisons = _comparisons(out_metrics)
    adjusted = holm_adjust([c.get("p_value") for c in comparisons])
    for comparison, p in zip(comparisons, adjusted, strict=True):
        comparison["p_value_holm"] = p
