"""End-to-end assignment: ``POST /v1/assignment`` latency at a FIXED rate, and bucketing throughput.

A benchmark, not a timed test (``abstream bench assign``). It starts a private stack (tansu on a free port and
one ``abstream gateway`` process loading tests.json, whose two RUNNING experiments every request is assigned
to), then a SEPARATE load process sends ``--rate`` requests/s for ``--duration`` seconds, each for a distinct
user (so every answer is a fresh bucketing plus two assignment records acknowledged by Kafka before the
answer). The load is open loop: each request's latency counts from its scheduled send time, so a stalled
gateway cannot hide its queue (no coordinated omission). For reference, the same broker alone: a producer with
the gateway's settings sending the two records of each request at the same rate (the latency floor Kafka
sets). Then, with the stack stopped, the bucketing throughput of ``abstream.bench.bucketing`` (users/s).

Targets (issue 3): p99 <= 5 ms at 2,000 requests/s; >= 1,000,000 bucketings/s. Writes bench-results/assign.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abstream.bench import loadgen

TARGET_P99_MS = 5.0
TARGET_RATE = 2000.0
TARGET_BUCKETINGS = 1_000_000.0


def bucketing_rates(n_users: int, repeat: int) -> dict[str, float]:
    """Bucketer throughput as ``abstream bench bucketing`` measures it (same experiment, ids and timing)."""
    from abstream.bench import bucketing
    from gateway.assignment import Bucketer

    users = [str(uuid.UUID(int=i * 0x9E3779B97F4A7C15 % (1 << 128))) for i in range(n_users)]
    bucketer = Bucketer(bucketing.SEED, bucketing.KEY, 1.0, bucketing.WEIGHTS)
    variant_index: Callable[[str], int | None] = bucketer.variant_index

    def single() -> None:
        for user_id in users:
            variant_index(user_id)

    return {
        "variant_index": bucketing._rate(single, n_users, repeat),
        "variant_indexes_batch": bucketing._rate(lambda: bucketer.variant_indexes(users), n_users, repeat),
    }


async def kafka_floor(settings: Any, rate: float, duration_s: float) -> dict[str, Any]:
    """The broker's share of an assignment's latency: the gateway's producer settings, the same rate, two
    records per request (one per RUNNING experiment) keyed by user, timed from the first send to both acks."""
    from aiokafka import AIOKafkaProducer

    from abstream.config import TOPIC_ASSIGNMENTS
    from abstream.kafka import producer_settings

    producer = AIOKafkaProducer(**producer_settings(settings))
    await producer.start()
    topic = settings.topic(TOPIC_ASSIGNMENTS)
    value = b"x" * 330  # an AssignmentRecord's size
    latencies: list[float] = []
    tasks: set[asyncio.Future[None]] = set()

    async def request(i: int) -> None:
        key = b"floor-%d" % i
        t = time.perf_counter()
        first = await producer.send(topic, value, key=key)
        second = await producer.send(topic, value, key=key)
        await asyncio.gather(first, second)
        if i >= warm:
            latencies.append((time.perf_counter() - t) * 1000)

    warm = int(rate)  # the first second is not counted
    total = int(rate * (duration_s + 1))
    try:
        start = time.perf_counter()
        i = 0
        while i < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while i < due:
                task = asyncio.ensure_future(request(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    return {"rate": rate, "requests": len(latencies), "records_per_request": 2, **loadgen.latency_summary(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream bench assign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="requests/s, fixed (default 2000)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the same rate before measuring")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections of the client")
    parser.add_argument("--bucketing-users", type=int, default=300_000, help="users per bucketing run")
    parser.add_argument("--repeat", type=int, default=3, help="bucketing runs; the best counts")
    parser.add_argument("--out", type=Path, default=Path("bench-results/assign.json"))
    parser.add_argument(
        "--profile", metavar="SVG", help="py-spy flame graph (.svg) or raw stacks (.txt) of the gateway"
    )
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the Kafka-alone reference run")
    parser.add_argument("--keep-logs", action="store_true", help="keep the stack's logs (temp dir) after the run")
    loadgen.add_quiet_args(parser)
    args = parser.parse_args(argv)

    n = int(args.rate * (args.warmup + args.duration)) + 1
    t0 = time.perf_counter()
    bodies = loadgen.make_assignment_bodies(n)
    print(f"{n:,} distinct users generated in {time.perf_counter() - t0:.1f}s")
    with loadgen.private_stack(keep_dir=args.keep_logs) as stack:
        print(f"stack: tansu {stack.settings.kafka_bootstrap_servers}, gateway {stack.gateway_url}")
        url = f"{stack.gateway_url}/v1/assignment"
        warm = loadgen.write_pool(stack.work_dir / "assign-warm.bin", loadgen.make_assignment_bodies(2000, seed=1))
        loadgen.run_client(url, warm, rate=500, duration_s=2, warmup_s=1, connections=8, expect_events=False)
        pool = loadgen.write_pool(stack.work_dir / "assign.bin", bodies)
        print(f"/v1/assignment at a fixed {args.rate:,.0f} requests/s for {args.duration:.0f}s ...", flush=True)
        with (
            loadgen.measured_run(stack.pids(), args) as cpu,
            loadgen.py_spy(stack.gateway_pid, args.profile, args.warmup + args.duration),
        ):
            result = loadgen.run_client(
                url,
                pool,
                rate=args.rate,
                duration_s=args.duration,
                warmup_s=args.warmup,
                connections=args.connections,
                expect_events=False,
            )
        result["cpu"] = cpu.result
        stack.check_alive()
        floor: dict[str, Any] | None = None
        if args.floor:
            print(f"Kafka alone (no gateway): 2 records per request at {args.rate:,.0f}/s, 10s ...", flush=True)
            with loadgen.measured_run(stack.pids(), args) as cpu:
                floor = loadgen.run_async(kafka_floor(stack.settings, args.rate, 10.0))
            floor["cpu"] = cpu.result

    print(f"bucketing: {args.bucketing_users:,} users, best of {args.repeat} ...", flush=True)
    rates = bucketing_rates(args.bucketing_users, args.repeat)
    lat = result["latency_ms"]
    report: dict[str, Any] = {
        "benchmark": "assign",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": loadgen.machine(),
        "config": {
            "rate": args.rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "client": result["client"],
            "gateway": "1 process (abstream gateway, uvicorn); tests.json: 2 RUNNING experiments",
        },
        "assignment": result,
        "kafka_floor_ms": floor,
        "bucketing_per_s": rates,
        "targets": {
            "p99_ms": {"target": TARGET_P99_MS, "value": lat["p99"], "pass": lat["p99"] <= TARGET_P99_MS},
            "achieved_rate": {
                "target": args.rate,
                "value": result["rps"],
                "pass": result["rps"] >= 0.98 * args.rate and loadgen.failures(result) == 0,
            },
            "bucketings_per_s": {
                "target": TARGET_BUCKETINGS,
                "value": rates["variant_index"],
                "pass": rates["variant_index"] >= TARGET_BUCKETINGS,
            },
        },
    }
    print_report(report)
    loadgen.write_json(args.out, report)
    print(f"results written to {args.out}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    r = report["assignment"]
    cfg = report["config"]
    print()
    print(f"abstream bench assign: {cfg['client']}; {cfg['gateway']}")
    rows: list[list[object]] = []
    for name, key in (("latency from scheduled send", "latency_ms"), ("service time (from actual send)", "service_ms")):
        lat = r[key]
        rows.append([name, lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["p999"], lat["max"]])
    floor = report.get("kafka_floor_ms")
    if floor:
        rows.append(
            ["Kafka alone: 2 records acked (no gateway)"]
            + [floor[k] for k in ("p50", "p90", "p95", "p99", "p999", "max")]
        )
    loadgen.print_table(["/v1/assignment", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"], rows)
    cpu = r["cpu"]
    print(
        f"offered {cfg['rate']:,.0f} requests/s, achieved {r['rps']:,.0f}/s over {r['elapsed_s']:.1f}s; "
        f"{r['ok']:,} answered 200, {loadgen.failures(r)} failed (status {r['status']}); client send lateness p99 "
        f"{r['send_lateness_ms']['p99']:.2f} ms"
    )
    print(
        f"CPU (% of one core): gateway {cpu['gateway']}, broker {cpu['broker']}, load process {cpu['load']}, "
        f"other processes on the machine {cpu['others']}; the gateway waited for a CPU "
        f"{cpu['gateway_runqueue_wait']:.1f}% of the time"
    )
    if floor:
        c = floor["cpu"]
        print(
            f"Kafka alone: broker {c['broker']}% CPU, waited for a CPU {c['broker_runqueue_wait']:.1f}% of the time; "
            f"other processes {c['others']}%"
        )
    rates = report["bucketing_per_s"]
    print(
        f"bucketing: {rates['variant_index']:,.0f} users/s (Bucketer.variant_index), "
        f"{rates['variant_indexes_batch']:,.0f} users/s (batch)"
    )
    for name, t in report["targets"].items():
        op = "<=" if name == "p99_ms" else ">="
        goal = f"98% of {t['target']:,.0f}, no failures" if name == "achieved_rate" else f"{t['target']:,}"
        print(f"target {name}: {t['value']:,.2f} {op} {goal}  {'PASS' if t['pass'] else 'MISS'}")


if __name__ == "__main__":
    raise SystemExit(main())
