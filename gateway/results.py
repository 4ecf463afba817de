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
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from abstream.clickhouse import async_client, describe_failure
from abstream.config import Settings
from abstream.stats import AnalysisOptions, VariantMoments, analyze_metric, holm_adjust, srm_check
from schemas.analysis import MetricDefinition, SourceKind, default_metrics
from schemas.errors import ApiError
from schemas.experiments import Experiment

log = logging.getLogger(__name__)

LEVELS = (0.90, 0.95, 0.99)

EXPOSED_SQL = (
    "SELECT variant_id, sum(users) FROM experiment_exposed_by_partition FINAL "
    "WHERE experiment_id = {experiment_id:UInt32} AND phase = {phase:UInt32} GROUP BY variant_id"
)
SOURCES_SQL = (
    "SELECT variant_id, source, name, sum(users_with_metric), sum(event_count), sum(sum_x), sum(sum_x2), "
    "sum(users_with_pre), sum(sum_y), sum(sum_y2), sum(sum_xy), sum(users_with_both) "
    "FROM experiment_source_rollups_by_partition FINAL "
    "WHERE experiment_id = {experiment_id:UInt32} AND phase = {phase:UInt32} GROUP BY variant_id, source, name"
)
RATIOS_SQL = (
    "SELECT variant_id, metric, sum(sum_x), sum(sum_x2), sum(sum_y), sum(sum_y2), sum(sum_xy) "
    "FROM experiment_ratio_rollups_by_partition FINAL "
    "WHERE experiment_id = {experiment_id:UInt32} AND phase = {phase:UInt32} GROUP BY variant_id, metric"
)
FRESHNESS_SQL = (
    "SELECT max(watermark), max(run_at) FROM (SELECT watermark, run_at FROM rollup_runs ORDER BY run_at DESC LIMIT 500)"
)

SourceRow = tuple[int, int, float, float, int, float, float, float, int]
"""users_with_metric, event_count, sum_x, sum_x2, users_with_pre, sum_y, sum_y2, sum_xy, users_with_both"""


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
            return list((await self._client.query(sql, parameters=params)).result_rows)
        except Exception:
            client, self._client = self._client, None  # reconnect next time
            if client is not None:
                await client.close()
            raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def parse_level(value: str | None) -> float:
    """The ``level`` query parameter: 0.90, 0.95 (default) or 0.99 (also as 90/95/99)."""
    if value is None or value == "":
        return 0.95
    try:
        level = float(value)
    except ValueError:
        level = -1.0
    if level > 1:
        level /= 100
    for allowed in LEVELS:
        if abs(level - allowed) < 1e-9:
            return allowed
    message = f"level must be one of 0.90, 0.95, 0.99 (got {value!r})"
    raise ApiError(400, "invalid_parameter", message, [{"field": "level", "code": "invalid_level", "message": message}])


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _moments(metric: MetricDefinition, variant_key: str, n: int, row: SourceRow | None, cuped: bool) -> VariantMoments:
    """A variant's sufficient statistics of one (non-ratio) metric's per-user value x (and covariate y)."""
    wm, count, sx, sx2, wp, sy, sy2, sxy, wb = row or (0, 0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0)
    if metric.type == "proportion":
        x, x2, y, y2, xy = float(wm), float(wm), float(wp), float(wp), float(wb)
    else:
        x, x2, y, y2, xy = float(sx), float(sx2), float(sy), float(sy2), float(sxy)
    if not cuped:
        return VariantMoments(variant_key, n, int(wm), x, x2)
    return VariantMoments(variant_key, n, int(wm), x, x2, y, y2, xy)


async def experiment_results(
    reader: RollupReader, experiment: Experiment, level: float = 0.95, metric_key: str | None = None
) -> dict[str, Any]:
    """The results body of one experiment (its current phase) from the cumulative rollups."""
    params = {"experiment_id": experiment.id, "phase": experiment.phase}
    t0 = time.perf_counter()
    try:
        exposed_rows = await reader.query(EXPOSED_SQL, params)
        source_rows = await reader.query(SOURCES_SQL, params)
        ratio_rows = await reader.query(RATIOS_SQL, params) if _has_ratio(experiment.metrics) else []
        fresh_rows = await reader.query(FRESHNESS_SQL, {})
    except Exception as exc:  # noqa: BLE001 - any ClickHouse failure is a clear 503, never a 500 or its text
        log.warning("results of experiment %d unavailable: %s", experiment.id, describe_failure(reader.settings, exc))
        raise ApiError(
            503, "results_unavailable", "the results store (ClickHouse) cannot be read; retry shortly",
            headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    exposed = {int(v): int(n) for v, n in exposed_rows}
    sources: dict[tuple[str, str], dict[int, SourceRow]] = {}
    for variant_id, source, name, *stats in source_rows:
        sources.setdefault((source, name), {})[int(variant_id)] = tuple(stats)  # type: ignore[assignment]
    ratios: dict[str, dict[int, tuple[float, ...]]] = {}
    for variant_id, name, *stats in ratio_rows:
        ratios.setdefault(name, {})[int(variant_id)] = tuple(float(v) for v in stats)

    metrics = list(experiment.metrics) if experiment.metrics else _observed_defaults(sources)
    if metric_key is not None:
        chosen = [m for m in metrics if m.key == metric_key]
        if not chosen:
            known = ", ".join(m.key for m in metrics) or "none yet"
            raise ApiError(404, "metric_not_found", f"no metric {metric_key!r} in this experiment (metrics: {known})")
        metrics = chosen

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
            analysed = analyze_metric("ratio", moments, control.key, options)
        else:
            rows_by_variant = sources.get(metric.source, {})
            moments = [
                _moments(metric, v.key, exposed.get(v.variant_id, 0), rows_by_variant.get(v.variant_id), cuped)
                for v in experiment.variants
            ]
            analysed = analyze_metric(
                "proportion" if metric.type == "proportion" else "mean", moments, control.key, options
            )
        for variant, entry in zip(experiment.variants, analysed, strict=True):
            entry["variant_id"] = variant.variant_id
        out_metrics.append({
            "key": metric.key, "name": metric.label, "type": metric.type,
            "source": None if metric.type == "ratio" else {"kind": metric.source[0], "name": metric.source[1]},
            "numerator": metric.numerator, "denominator": metric.denominator, "variants": analysed,
        })  # fmt: skip
    _holm(out_metrics)

    counts = [exposed.get(v.variant_id, 0) for v in experiment.variants]
    srm = srm_check(counts, [v.weight for v in experiment.variants])
    watermark, run_at = fresh_rows[0] if fresh_rows else (None, None)
    age = None if run_at is None else max(0.0, time.time() - _aware(run_at).timestamp())
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
        "multiple_testing": {"method": "holm", "comparisons": _count_p(out_metrics)},
        "srm": srm,
        "data_freshness": {
            "latest_event_time": _iso(_aware(watermark) if watermark is not None else None),
            "rollups_updated_at": _iso(_aware(run_at) if run_at is not None else None),
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


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _has_ratio(metrics: Sequence[MetricDefinition] | None) -> bool:
    return any(m.type == "ratio" for m in metrics or ())


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
