"""`abstream bench worker`: stream-worker throughput and freshness on a private embedded stack.

1. Throughput: N events (records of ``--batch`` events of one user, as the gateway writes them; a third
   of the users assigned to both seeded experiments) are produced to Kafka first, then ONE worker process
   is started and timed from its first flush to the last event in event_logs: events/s per process
   through enrichment, the ClickHouse sink and aggregation. Baseline in the same run: a bare aiokafka
   consumer reading and JSON-decoding the same records (the floor any Kafka consumer pays).
2. Freshness: with the worker caught up, the gateway receives a steady load; for probe events the time
   from the gateway's HTTP acknowledgement to the row in event_logs (its inserted_at) and to its
   daily rollup row (updated_at) gives p50/p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from abstream.bench import loadgen
from abstream.clickhouse import client as ch_client
from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, Settings
from abstream.devstack.ports import free_port, port_open
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy
from abstream.kafka import ensure_topics, producer_settings
from abstream.migrate import migrate

NAMES = ["app_open", "screen_view", "workout_started", "workout_completed", "session_submitted", "creature_fed"]


def _record(user: str, n: int, now_ms: int) -> bytes:
    events = []
    for i in range(n):
        t = now_ms - random.randint(0, 3_600_000)
        events.append({
            "event_id": uuid.uuid4().hex, "event_id_source": "client", "kind": "event",
            "event_name": random.choice(NAMES), "occurred_at": t, "occurred_at_ms": t, "sent_at": None,
            "skew_ms": None, "corrected_at_ms": None, "session_id": f"s-{user}", "platform": "ios",
            "app_version": "1.4.2", "install_id": f"i-{user}", "experiment_id": None, "metric_name": None,
            "value": None, "properties": {"screen": "home", "index": i, "duration_ms": random.randint(1, 9000)},
            "context": {"locale": "en_US", "tz": "Europe/Berlin"},
        })  # fmt: skip
    return orjson.dumps({"v": 1, "user_id": user, "surface": "v1", "received_at_ms": now_ms, "events": events})


def _assignment(user: str, exp: int, key: str, variant: int, vkey: str, at: int) -> bytes:
    return orjson.dumps({
        "v": 1, "user_id": user, "experiment_key": key, "experiment_id": exp, "variant_key": vkey,
        "variant_id": variant, "phase": 1, "assignment_version": "bench", "assigned_at": at,
        "platform": "ios", "app_version": "1.4.2", "surface": "v1",
    })  # fmt: skip


async def produce(settings: Settings, events: int, batch: int) -> int:
    await ensure_topics(settings)
    producer = AIOKafkaProducer(**{**producer_settings(settings), "linger_ms": 20})
    await producer.start()
    now = int(time.time() * 1000)
    users = [f"bench-{i:06d}" for i in range(max(1, events // (batch * 4)))]
    for user in users[::3]:
        await producer.send(settings.topic(TOPIC_ASSIGNMENTS), _assignment(
            user, 3, "exp_3_landing_journey", 3001 + hash(user) % 3, "ABC"[hash(user) % 3], now - 7_200_000),
            key=user.encode())  # fmt: skip
    sent = 0
    while sent < events:
        user = random.choice(users)
        n = min(batch, events - sent)
        await producer.send(settings.topic(TOPIC_EVENTS), _record(user, n, now), key=user.encode())
        sent += n
    await producer.flush()
    await producer.stop()
    return sent


async def bare_consumer(settings: Settings, events: int) -> float:
    """events/s of a raw aiokafka consumer that decodes every record (the floor of any consumer)."""
    consumer = AIOKafkaConsumer(
        settings.topic(TOPIC_EVENTS), bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, max_partition_fetch_bytes=8 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    seen = 0
    t0 = time.perf_counter()
    while seen < events:
        batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
        for msgs in batch.values():
            for m in msgs:
                seen += len(orjson.loads(m.value)["events"])
    elapsed = time.perf_counter() - t0
    await consumer.stop()
    return seen / elapsed


def _child(name: str, argv: list[str], health: str, logs: Path) -> Child:
    return Child(name, argv, health, lambda: http_ok(health), log_path=logs / f"{name}.log")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream bench worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=50, help="events per Kafka record (one request's events)")
    parser.add_argument("--probes", type=int, default=200, help="freshness probes")
    parser.add_argument("--rate", type=float, default=20.0, help="probe requests/s (50 events each)")
    parser.add_argument("--profile", help="write a py-spy flame graph of the worker to this SVG")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="abstream-bench-worker-"))
    bport, cport, gport, wport = free_port(), free_port(), free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap_servers=f"127.0.0.1:{bport}", clickhouse_url=f"http://default:@127.0.0.1:{cport}",
        kafka_topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", log_level="WARNING", admin_token="",
    )  # fmt: skip
    env = settings.as_env()
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        broker = Child("broker", abstream_argv("broker", "--port", str(bport)), f"127.0.0.1:{bport}",
                       lambda: port_open("127.0.0.1", bport), log_path=work / "broker.log")  # fmt: skip
        ch = _child("clickhouse", abstream_argv("clickhouse-local", "--port", str(cport), "--path", str(work / "ch")),
                    f"http://127.0.0.1:{cport}/ping", work)  # fmt: skip
        for c in (broker, ch):
            c.start(env)
            stack.callback(c.stop)
            wait_healthy(c, 60)
        migrate(settings, log=False)
        print(f"producing {args.events} events in records of {args.batch} ...", flush=True)
        produced = asyncio.run(produce(settings, args.events, args.batch))
        bare = asyncio.run(bare_consumer(settings, produced))
        print(f"bare aiokafka consumer (read + decode): {bare:,.0f} events/s", flush=True)

        worker = _child("worker", abstream_argv("worker", "--web-port", str(wport)),
                        f"http://127.0.0.1:{wport}/health", work)  # fmt: skip
        t_start = time.time()
        worker.start(env)
        stack.callback(worker.stop)
        wait_healthy(worker, 60)
        if args.profile:
            fmt = "raw" if args.profile.endswith(".txt") else "flamegraph"
            spy = subprocess.Popen(
                [loadgen.py_spy_path(), "record", "-o", args.profile, "--format", fmt, "--pid", str(worker.proc.pid),
                 "-d", "20"]
            )  # fmt: skip
            stack.callback(spy.wait)
        client = ch_client(settings)
        while True:
            count = client.query("SELECT count() FROM event_logs").result_rows[0][0]
            if count >= produced:
                break
            if time.time() - t_start > 600:
                print(f"worker did not finish: {count}/{produced}")
                return 1
            time.sleep(0.5)
        first, last, rows = client.query(
            "SELECT min(run_at) - min(duration_ms) / 1000, max(run_at), sum(event_rows) FROM rollup_runs"
        ).result_rows[0]  # fmt: skip
        elapsed = (last - first).total_seconds()
        eps = rows / elapsed
        print(f"worker: {rows:,} events in {elapsed:.1f}s from first to last flush = {eps:,.0f} events/s "
              f"(1 process; {eps / bare:.2f}x the bare consumer)", flush=True)  # fmt: skip
        results["throughput"] = {"events": rows, "seconds": elapsed, "events_per_s": eps, "bare_consumer": bare}

        gateway = _child("gateway", abstream_argv("gateway", "--port", str(gport)),
                         f"http://127.0.0.1:{gport}/health/ready", work)  # fmt: skip
        gateway.start(env)
        stack.callback(gateway.stop)
        wait_healthy(gateway, 60)
        acks: dict[str, float] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{gport}", timeout=10) as http:
            interval = 1.0 / args.rate
            next_at = time.time()
            for i in range(args.probes):
                probe = f"probe_{i}"
                user = f"fresh-{random.randint(0, 5000)}"
                events = [{"event_name": random.choice(NAMES), "occurred_at": int(time.time() * 1000),
                           "properties": {"i": j}} for j in range(49)]  # fmt: skip
                events.append({"event_name": probe, "occurred_at": int(time.time() * 1000)})
                r = http.post("/v1/events", json={"anonymous_user_id": user, "platform": "ios", "events": events})
                if r.status_code == 200:
                    acks[probe] = time.time()
                next_at += interval
                time.sleep(max(0.0, next_at - time.time()))
        time.sleep(6)
        log_rows = dict(client.query(
            "SELECT event_name, toUnixTimestamp64Milli(min(inserted_at)) FROM event_logs "
            "WHERE startsWith(event_name, 'probe_') GROUP BY event_name").result_rows)  # fmt: skip
        rollup_rows = dict(client.query(
            "SELECT event_name, toUnixTimestamp64Milli(min(updated_at)) FROM daily_metric_rollups_by_partition "
            "WHERE startsWith(event_name, 'probe_') GROUP BY event_name").result_rows)  # fmt: skip
        to_log = [log_rows[p] / 1000 - t for p, t in acks.items() if p in log_rows]
        to_rollup = [rollup_rows[p] / 1000 - t for p, t in acks.items() if p in rollup_rows]
        client.close()
        missing = len(acks) - len(to_log)
        results["freshness"] = {
            "probes": len(acks), "missing": missing,
            "event_logs_p50_s": percentile(to_log, 50), "event_logs_p95_s": percentile(to_log, 95),
            "rollups_p50_s": percentile(to_rollup, 50), "rollups_p95_s": percentile(to_rollup, 95),
            "mean_event_logs_s": statistics.fmean(to_log) if to_log else None,
        }  # fmt: skip
        f = results["freshness"]
        print(f"freshness over {len(acks)} probes ({args.rate:g} req/s of 50 events): gateway ack -> event_logs "
              f"p50 {f['event_logs_p50_s']:.3f}s p95 {f['event_logs_p95_s']:.3f}s; -> rollups "
              f"p50 {f['rollups_p50_s']:.3f}s p95 {f['rollups_p95_s']:.3f}s; missing {missing}")  # fmt: skip
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "worker.json").write_text(json.dumps(results, indent=2))
    return 0
