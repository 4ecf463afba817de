"""Figures of a benchmark run: percentiles, one load run's result (the same shape from every load client),
failures, the table printer, results as JSON and the machine they were measured on."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def failures(result: dict[str, Any]) -> int:
    """Requests that did not end in a 200 (wrk's or the asyncio client's result)."""
    if isinstance(result.get("errors"), dict):  # wrk: socket errors plus non-200 answers
        return int(sum(result["errors"].values()) - result["errors"].get("status", 0) + result.get("non_200", 0))
    return int(result["requests"] - result["ok"] + result["errors"])


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    values = sorted(values_ms)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "p999": percentile(values, 99.9),
        "max": values[-1] if values else 0.0,
        "mean": sum(values) / len(values) if values else 0.0,
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}


def client_summary(
    *,
    client: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    count_events: bool,
    latencies: list[float],
    service: list[float],
    lateness: list[float],
    statuses: dict[int, int],
    error_samples: list[str],
    error_count: int,
    measure_from: float,
    last_done: float,
    queued: int,
    connections_used: int,
    accepted: int,
    duplicates: int,
) -> dict[str, Any]:
    """One run's result, the same shape from either fixed-rate client (and the asyncio closed loop)."""
    n = len(latencies)
    elapsed = (last_done - measure_from) if n else 0.0
    if rate <= 0:
        elapsed = duration_s
    ok = statuses.get(200, 0)
    out: dict[str, Any] = {
        "client": client,
        "mode": "fixed" if rate > 0 else "closed",
        "offered_rps": rate if rate > 0 else None,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "requests": n,
        "ok": ok,
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "errors": error_count,
        "error_samples": error_samples[:5],
        "elapsed_s": elapsed,
        "rps": ok / elapsed if elapsed else 0.0,
        "latency_ms": latency_summary(latencies),
        "service_ms": latency_summary(service),
        "send_lateness_ms": latency_summary(lateness),
        "requests_due_with_no_idle_connection": queued,
        "connections_used": connections_used,
    }
    if count_events:
        out["accepted_events"] = accepted
        out["duplicates"] = duplicates
        # published events only: a duplicate is answered "accepted" but not sent to Kafka again
        out["events_per_s"] = (accepted - duplicates) / elapsed if elapsed else 0.0
    return out
