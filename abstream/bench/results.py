"""`abstream bench results`: how fast an experiment's results answer, at 1M and at 10M events.

On a private embedded stack (broker, ClickHouse endpoint, gateway), one experiment per scale is created
through the API (eight event metrics, a tracked sum and a ratio, sequential testing on: every figure the
API computes). Its cumulative rollups are then written as the stream workers write them: per Kafka
partition, several versions of each row (the ReplacingMergeTree rows a worker leaves between merges),
holding the sums of simulated per-user values (numpy: Poisson event counts with a pre-exposure
covariate) for the number of users and events asked. Then ``GET /apiv1/ab-tests/{id}/results`` is timed
over HTTP, scales interleaved, and p50/p95/p99 printed with the server-side query time. The rollups'
size depends on partitions x variants x sources, not on events, so the two scales should answer alike.

Baseline in the same run: the raw-log query the results endpoint used before the rollups (users and
events per variant from ``event_logs FINAL``) over ``--baseline-events`` events really stored in
event_logs, timed the same way.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.devstack.ports import free_port, port_open
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy
from abstream.migrate import migrate
from stream_workers.pipeline import EXPOSED_COLUMNS, RATIO_COLUMNS, SOURCE_COLUMNS

EVENTS = ["app_open", "screen_view", "workout_started", "workout_completed", "session_submitted", "creature_fed",
          "purchase", "share"]  # fmt: skip
SHARE = np.array([0.25, 0.3, 0.12, 0.1, 0.08, 0.08, 0.02, 0.05])
VERSIONS = 3
"""Versions of every rollup row written (as successive flushes leave them before a merge)."""


def experiment_body(tag: str) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = [{"key": f"n_{e}", "type": "count", "event": e} for e in EVENTS]
    metrics += [
        {"key": "converted", "type": "proportion", "event": "purchase"},
        {"key": "revenue", "type": "sum", "tracked": "revenue"},
        {"key": "revenue_per_open", "type": "ratio", "numerator": "revenue", "denominator": "n_app_open"},
    ]
    return {
        "test_name": f"bench results {tag}",
        "variants": [{"variant_name": "control", "weight": 1}, {"variant_name": "treatment", "weight": 1}],
        "metrics": metrics,
        "sequential_testing": True,
    }


def rollup_rows(
    experiment_id: int, variant_ids: list[int], users: int, events: int, partitions: int, seed: int
) -> dict[str, list[list[Any]]]:
    """The cumulative rollup rows the workers would hold for these simulated users."""
    rng = np.random.default_rng(seed)
    variant = rng.integers(0, len(variant_ids), users)
    partition = rng.integers(0, partitions, users)
    per_user = events / users
    lam = per_user * SHARE  # mean events per user per source
    pre = rng.poisson(lam * 0.8, (users, len(EVENTS))).astype(np.float64)
    x = rng.poisson(lam * 0.3, (users, len(EVENTS))) + rng.binomial(pre.astype(np.int64), 0.9)
    x = x.astype(np.float64)
    revenue = np.where(x[:, EVENTS.index("purchase")] > 0, rng.gamma(2.0, 12.0, users), 0.0)
    out: dict[str, list[list[Any]]] = {"x": [], "c": [], "r": []}
    version = time.time_ns() // 1000
    opens = x[:, EVENTS.index("app_open")]
    for v_index, variant_id in enumerate(variant_ids):
        for p in range(partitions):
            mask = (variant == v_index) & (partition == p)
            for k in range(VERSIONS):
                ver = version + k
                out["x"].append([experiment_id, 1, variant_id, p, int(mask.sum()), ver])
                for j, name in enumerate(EVENTS):
                    xs, ys = x[mask, j], pre[mask, j]
                    out["c"].append([
                        experiment_id, 1, variant_id, "event", name, p, int((xs > 0).sum()), int(xs.sum()),
                        float(xs.sum()), float((xs * xs).sum()), int((ys > 0).sum()), float(ys.sum()),
                        float((ys * ys).sum()), float((xs * ys).sum()), int(((xs > 0) & (ys > 0)).sum()),
                        int((xs != 0).sum()), ver,
                    ])  # fmt: skip
                rv = revenue[mask]
                out["c"].append([
                    experiment_id, 1, variant_id, "tracked", "revenue", p, int((rv > 0).sum()), int((rv > 0).sum()),
                    float(rv.sum()), float((rv * rv).sum()), 0, 0.0, 0.0, 0.0, 0, int((rv != 0).sum()), ver,
                ])  # fmt: skip
                ov = opens[mask]
                out["r"].append([
                    experiment_id, 1, variant_id, "revenue_per_open", p, float(rv.sum()), float((rv * rv).sum()),
                    float(ov.sum()), float((ov * ov).sum()), float((rv * ov).sum()), ver,
                ])  # fmt: skip
    return out


def raw_events(client: Any, experiment_key: str, variant_keys: list[str], events: int) -> None:
    """``events`` rows in event_logs for the baseline query (enriched with the experiment)."""
    client.command(
        "INSERT INTO event_logs (event_id, event_name, kind, user_id, surface, event_time, occurred_at, received_at, "
        "experiment_map, kafka_partition, kafka_offset, enriched_version) "
        "SELECT toString(generateUUIDv4()), arrayElement({names:Array(String)}, (number % 8) + 1), 'event', "
        "concat('u', toString(number % {users:UInt64})), 'v1', now64(3), now64(3), now64(3), "
        "map({key:String}, arrayElement({variants:Array(String)}, (intHash32(number % {users:UInt64}) % 2) + 1)), "
        "number % 12, number, 1 FROM numbers({n:UInt64})",
        parameters={
            "names": EVENTS,
            "users": max(1, events // 10),
            "key": experiment_key,
            "variants": variant_keys,
            "n": events,
        },  # fmt: skip
    )


BASELINE_SQL = (
    "SELECT experiment_map[{key:String}] AS variant_key, event_name, uniqExact(user_id), count() "
    "FROM event_logs FINAL WHERE mapContains(experiment_map, {key:String}) GROUP BY variant_key, event_name"
)


@contextmanager
def rollup_stack(name: str, **overrides: Any) -> Iterator[tuple[Settings, str]]:
    """A private embedded stack for read benchmarks: broker, ClickHouse endpoint (migrated) and a gateway;
    yields (settings, gateway URL) and stops everything after."""
    work = Path(tempfile.mkdtemp(prefix=f"abstream-bench-{name}-"))
    bport, cport, gport = free_port(), free_port(), free_port()
    settings = Settings.from_env(**{
        "kafka_bootstrap_servers": f"127.0.0.1:{bport}", "clickhouse_url": f"http://default:@127.0.0.1:{cport}",
        "kafka_topic_prefix": f"bench{uuid.uuid4().hex[:6]}.", "log_level": "WARNING", "admin_token": "",
        "data_dir": str(work), "gateway_port": gport, **overrides,
    })  # fmt: skip
    env = settings.as_env()
    base = f"http://127.0.0.1:{gport}"
    with ExitStack() as stack:
        broker = Child("broker", abstream_argv("broker", "--port", str(bport)), f"127.0.0.1:{bport}",
                       lambda: port_open("127.0.0.1", bport), log_path=work / "broker.log")  # fmt: skip
        ch = Child("clickhouse", abstream_argv("clickhouse-local", "--port", str(cport), "--path", str(work / "ch")),
                   f"http://127.0.0.1:{cport}/ping", lambda: http_ok(f"http://127.0.0.1:{cport}/ping"),
                   log_path=work / "clickhouse.log")  # fmt: skip
        for c in (broker, ch):
            c.start(env)
            stack.callback(c.stop)
            wait_healthy(c, 60)
        migrate(settings, log=False)
        gw = Child("gateway", abstream_argv("gateway", "--port", str(gport)), base,
                   lambda: http_ok(f"{base}/health/ready"), log_path=work / "gateway.log")  # fmt: skip
        gw.start(env)
        stack.callback(gw.stop)
        wait_healthy(gw, 60)
        yield settings, base
    shutil.rmtree(work, ignore_errors=True)


def timed(fn: Any, n: int, progress: Progress, label: str) -> list[float]:
    out = []
    task = progress.add_task(label, total=n)
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        progress.advance(task)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream bench results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--scales", default="1000000:100000,10000000:1000000",
                        help="events:users pairs, comma separated (default: 1M/100k and 10M/1M)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=300, help="timed requests per scale")
    parser.add_argument("--baseline-events", type=int, default=1_000_000,
                        help="events stored in event_logs for the raw-scan baseline (0: skip it)")  # fmt: skip
    parser.add_argument("--partitions", type=int, default=12)
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    scales = [tuple(int(v) for v in pair.split(":")) for pair in args.scales.split(",")]
    console = Console(width=None if sys.stdout.isatty() else 120)

    with rollup_stack("results") as (settings, base):
        client = ch_client(settings)
        http = httpx.Client(base_url=base, timeout=30)
        experiments = []
        with Progress(console=console) as progress:
            for events, users in scales:
                r = http.post("/apiv1/ab-tests", json=experiment_body(f"{events}-{uuid.uuid4().hex[:4]}"))
                r.raise_for_status()
                test = r.json()
                task = progress.add_task(f"rollups of {events:,} events / {users:,} users", total=1)
                rows = rollup_rows(test["id"], [v["id"] for v in test["variants"]], users, events, args.partitions,
                                   seed=events)  # fmt: skip
                client.insert("experiment_exposed_by_partition", rows["x"], column_names=EXPOSED_COLUMNS)
                client.insert("experiment_source_rollups_by_partition", rows["c"], column_names=SOURCE_COLUMNS)
                client.insert("experiment_ratio_rollups_by_partition", rows["r"], column_names=RATIO_COLUMNS)
                progress.advance(task)
                experiments.append((events, users, test, sum(len(v) for v in rows.values())))
            now = datetime.now(UTC)
            client.insert("rollup_runs", [[now, "bench", [0], 0, 0, 0, now, 1.0]],
                          column_names=["run_at", "worker", "partitions", "event_rows", "assignment_rows",
                                        "rollup_rows", "watermark", "duration_ms"])  # fmt: skip
            for _, _, test, _ in experiments:  # warm: the first request connects to ClickHouse
                http.get(f"/apiv1/ab-tests/{test['id']}/results").raise_for_status()
            timings: dict[int, list[float]] = {e: [] for e, _, _, _ in experiments}
            server: dict[int, list[float]] = {e: [] for e, _, _, _ in experiments}
            task = progress.add_task("timing GET .../results", total=args.requests * len(experiments))
            for _ in range(args.requests):
                for events, _, test, _ in experiments:
                    t0 = time.perf_counter()
                    r = http.get(f"/apiv1/ab-tests/{test['id']}/results")
                    timings[events].append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    server[events].append(r.json()["query_ms"])
                    progress.advance(task)
            baseline: list[float] = []
            if args.baseline_events:
                _, _, test, _ = experiments[0]
                bt = progress.add_task(f"storing {args.baseline_events:,} raw events", total=1)
                raw_events(client, test["key"], [v["key"] for v in test["variants"]], args.baseline_events)
                progress.advance(bt)
                params = {"key": test["key"]}
                baseline = timed(lambda: client.query(BASELINE_SQL, parameters=params), 20, progress,
                                 "timing the raw-log baseline")  # fmt: skip

        table = Table(title="GET /apiv1/ab-tests/{id}/results (HTTP, sequential, one client)")
        for col in ("events", "users", "rollup rows", "metrics", "p50 ms", "p95 ms", "p99 ms", "server p50 ms"):
            table.add_column(col, justify="right")
        for events, users, _test, n_rows in experiments:
            t = timings[events]
            table.add_row(f"{events:,}", f"{users:,}", f"{n_rows:,}", str(len(experiment_body("")["metrics"])),
                          f"{pct(t, 50):.1f}", f"{pct(t, 95):.1f}", f"{pct(t, 99):.1f}",
                          f"{statistics.median(server[events]):.1f}")  # fmt: skip
        console.print(table)
        if baseline:
            console.print(
                f"baseline: the raw-log query over {args.baseline_events:,} events in event_logs FINAL "
                f"(users and events per variant only, no statistics): p50 {pct(baseline, 50):.1f} ms, "
                f"p95 {pct(baseline, 95):.1f} ms"
            )
        small, large = experiments[0][0], experiments[-1][0]
        ratio = pct(timings[large], 95) / pct(timings[small], 95)
        console.print(f"p95 at {large:,} events / p95 at {small:,} events: {ratio:.2f}x "
                      f"(target: flat; p95 <= 100 ms at 10M events)")  # fmt: skip
    return 0
