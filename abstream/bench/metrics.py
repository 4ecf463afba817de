"""`abstream bench metrics`: latency of every /v1/metrics endpoint over rollups holding 10 million events.

On a private embedded stack (broker, ClickHouse endpoint, gateway with a metrics token), the rollups a
month of traffic leaves are written as the stream workers write them (per Kafka partition, several
versions of each row): daily rollups (30 days x 8 events x platforms x app versions), the last-active-day
rollup of the users, per-day exposures and the cumulative rollups of three API-created experiments with
eleven metrics each (simulated per-user values, as in ``abstream bench results``), and the funnel rows of
tests.json's funnel for all users and per variant. Then each endpoint is requested over HTTP, one client,
sequentially, endpoints interleaved, and p50/p95/p99 printed against the issue's p99 target (50 ms).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from abstream.bench.results import EVENTS, SHARE, VERSIONS, experiment_body, pct, rollup_rows, rollup_stack
from abstream.clickhouse import client as ch_client
from stream_workers.pipeline import (
    DAILY_COLUMNS,
    EXPOSED_COLUMNS,
    EXPOSED_DAILY_COLUMNS,
    FUNNEL_COLUMNS,
    LAST_ACTIVE_COLUMNS,
    RATIO_COLUMNS,
    SOURCE_COLUMNS,
)

TOKEN = "bench-metrics-token"  # noqa: S105 - a private stack of the benchmark
TARGET_P99_MS = 50.0
PLATFORMS = ["ios", "android", ""]
APP_VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "2.0.0", "2.0.1"]


def daily_rows(events: int, users: int, days: int, partitions: int, rng: np.random.Generator) -> list[list[Any]]:
    today = datetime.now(UTC).date()
    per_day = events / days
    out: list[list[Any]] = []
    version = time.time_ns() // 1000
    for d in range(days):
        day = today - timedelta(days=d)
        for j, name in enumerate(EVENTS):
            total = per_day * SHARE[j]
            for p in range(partitions):
                part = total / partitions
                cells = rng.dirichlet(np.ones(len(PLATFORMS) * len(APP_VERSIONS))) * part
                for k in range(VERSIONS):
                    for i, platform in enumerate(PLATFORMS):
                        for v, app_version in enumerate(APP_VERSIONS):
                            n = int(cells[i * len(APP_VERSIONS) + v])
                            out.append([day, name, platform, app_version, p, n, max(1, n // 3), version + k])
                    out.append([day, name, "*", "*", p, int(part), max(1, int(part) // 3), version + k])
    return out


def last_active_rows(users: int, days: int, partitions: int) -> list[list[Any]]:
    today = datetime.now(UTC).date()
    version = time.time_ns() // 1000
    return [[today - timedelta(days=d), p, users // (days * partitions), version] for d in range(days)
            for p in range(partitions)]  # fmt: skip


def exposure_rows(test: dict[str, Any], users: int, days: int, partitions: int) -> list[list[Any]]:
    """Exposed users per exposure day (experiment_exposed_daily_by_partition), phase 1."""
    today = datetime.now(UTC).date()
    version = time.time_ns() // 1000
    share = users // (days * partitions * len(test["variants"]))
    return [[test["id"], 1, v["id"], today - timedelta(days=d), p, share, version] for v in test["variants"]
            for d in range(days) for p in range(partitions)]  # fmt: skip


def funnel_rows(groups: list[tuple[int, int]], users: int, partitions: int) -> list[list[Any]]:
    version = time.time_ns() // 1000
    steps = ["app_open", "workout_started", "session_submitted"]
    out = []
    for experiment_id, variant_id in groups:
        for p in range(partitions):
            reached = users // partitions // max(1, len(groups) - 1)
            for i, name in enumerate(steps, start=1):
                out.append(["workout_activation", experiment_id, variant_id, i, name, p, reached, version])
                reached = int(reached * 0.6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream bench metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per endpoint")
    parser.add_argument("--partitions", type=int, default=12)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console = Console(width=None if sys.stdout.isatty() else 120)
    rng = np.random.default_rng(20261204)

    with rollup_stack("metrics", metrics_token=TOKEN) as (settings, base):
        client = ch_client(settings)
        http = httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
        with Progress(console=console) as progress:
            task = progress.add_task(f"rollups of {args.events:,} events / {args.users:,} users", total=6)
            client.insert("daily_metric_rollups_by_partition",
                          daily_rows(args.events, args.users, args.days, args.partitions, rng),
                          column_names=DAILY_COLUMNS)  # fmt: skip
            progress.advance(task)
            client.insert("user_last_active_by_partition", last_active_rows(args.users, args.days, args.partitions),
                          column_names=LAST_ACTIVE_COLUMNS)  # fmt: skip
            progress.advance(task)
            tests = []
            for i in range(3):
                r = http.post("/apiv1/ab-tests", json=experiment_body(f"metrics-{i}-{time.time_ns()}"))
                r.raise_for_status()
                tests.append(r.json())
            for test in tests:
                rows = rollup_rows(test["id"], [v["id"] for v in test["variants"]], args.users // 3,
                                   args.events // 3, args.partitions, seed=test["id"])  # fmt: skip
                client.insert("experiment_exposed_by_partition", rows["x"], column_names=EXPOSED_COLUMNS)
                client.insert("experiment_source_rollups_by_partition", rows["c"], column_names=SOURCE_COLUMNS)
                client.insert("experiment_ratio_rollups_by_partition", rows["r"], column_names=RATIO_COLUMNS)
                client.insert("experiment_exposed_daily_by_partition",
                              exposure_rows(test, args.users // 3, args.days, args.partitions),
                              column_names=EXPOSED_DAILY_COLUMNS)  # fmt: skip
            progress.advance(task)
            manifest = {e["key"]: e for e in http.get("/apiv1/ab-tests").json()}
            groups = [(0, 0)] + [(e["id"], v["id"]) for k in ("exp_3_landing_journey", "exp_4_achievements_density")
                                 if (e := manifest.get(k)) for v in e["variants"]]  # fmt: skip
            client.insert("funnel_rollups_by_partition", funnel_rows(groups, args.users, args.partitions),
                          column_names=FUNNEL_COLUMNS)  # fmt: skip
            progress.advance(task)
            now = datetime.now(UTC)
            client.insert("rejected_events", [[now, "v1", "event", "invalid_event_name", "events.0.event_name",
                                               "bad", 0, "", "{}", 0, i] for i in range(10_000)],
                          column_names=["received_at", "surface", "scope", "code", "field", "message", "event_index",
                                        "user_id", "raw", "kafka_partition", "kafka_offset"])  # fmt: skip
            client.insert("rollup_runs", [[now, "bench", [0], 0, 0, 0, now, 1.0]],
                          column_names=["run_at", "worker", "partitions", "event_rows", "assignment_rows",
                                        "rollup_rows", "watermark", "duration_ms"])  # fmt: skip
            progress.advance(task)
            stored = client.query("SELECT sum(events) FROM daily_metric_rollups WHERE platform = '*'").result_rows
            progress.advance(task)

            today = date.today()
            endpoints = {
                "summary": ("/v1/metrics/summary", {}),
                "daily (30 days)": ("/v1/metrics/daily", {}),
                "daily (92 days, one event, ios)": ("/v1/metrics/daily", {
                    "from": (today - timedelta(days=91)).isoformat(), "to": today.isoformat(),
                    "event_name": "app_open", "platform": "ios"}),
                "experiments (all 5)": ("/v1/metrics/experiments", {}),
                "experiments (one)": ("/v1/metrics/experiments", {"experiment": str(tests[0]["id"])}),
                "funnels": ("/v1/metrics/funnels", {}),
                "funnels by experiment": ("/v1/metrics/funnels", {"experiment": "exp_3_landing_journey"}),
            }  # fmt: skip
            for path, params in endpoints.values():  # warm: the first request connects to ClickHouse
                http.get(path, params=params).raise_for_status()
            timings: dict[str, list[float]] = {k: [] for k in endpoints}
            task = progress.add_task("timing the endpoints", total=args.requests * len(endpoints))
            for _ in range(args.requests):
                for name, (path, params) in endpoints.items():
                    t0 = time.perf_counter()
                    r = http.get(path, params=params)
                    timings[name].append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    progress.advance(task)

        table = Table(title=f"/v1/metrics over rollups of {int(stored[0][0]):,} events stored in daily rollups, "
                            f"{args.users:,} users (HTTP, sequential, one client)")  # fmt: skip
        for col in ("endpoint", "p50 ms", "p95 ms", "p99 ms", f"p99 <= {TARGET_P99_MS:.0f} ms"):
            table.add_column(col, justify="right" if col != "endpoint" else "left")
        for name, values in timings.items():
            p99 = pct(values, 99)
            table.add_row(name, f"{pct(values, 50):.1f}", f"{pct(values, 95):.1f}", f"{p99:.1f}",
                          "yes" if p99 <= TARGET_P99_MS else "NO")  # fmt: skip
        console.print(table)
    return 0
