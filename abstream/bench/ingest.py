"""End-to-end ingestion: events/s the gateway acknowledges, next to a bare aiokafka producer on the same broker.

A benchmark, not a timed test (``abstream bench ingest``). It starts a private stack (tansu on a free port and
``abstream gateway`` with one server process per core, as deployed, or ``--gateway-workers N``; unique topic
prefix), then from SEPARATE load processes posts realistic ``POST /v1/events`` batches (50 events of ~300 bytes,
one user's session per request, client event_ids; each run posts ids the gateway has not seen, so nothing is
skipped as a duplicate):

1. max rate, identity and gzip, in ROUNDS that alternate with a bare aiokafka producer (same
   ``producer_settings``, acks=all) sending the same events ONE RECORD EACH: bare, gateway, bare, gateway, ...,
   bare (``--rounds`` x ``--slice`` seconds). The gateway is loaded by ``wrk`` (closed loop, 32 connections)
   with ``wrk/events.lua`` replaying a pre-generated pool of bodies (or, without wrk, this package's asyncio
   client in closed loop). Each gateway slice is compared with the bare producer's rate interpolated to its
   middle from the bare slices before and after it: this box's speed drifts by up to 1.5x within minutes, and
   one bare run before and one after the gateway runs made the verdict depend on the drift. The ratio reported
   is the median round's;
2. half of the median max-rate slice's requests/s, identity and gzip: a client at a FIXED rate (open loop;
   latency from each request's scheduled send time, so queueing is not hidden by coordinated omission):
   ``openloop.c``, built on first use with the system's C compiler, else this package's asyncio client (see
   ``loadgen``).

Events/s counts only events answered 200 with ``accepted`` and not flagged as duplicates (those are published
to Kafka). Targets (issue 5): gateway >= 2.0x the bare producer's events/s; p99 <= 25 ms at half of the maximum
rate. Prints a table; writes bench-results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections import deque
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson

from abstream.bench import loadgen
from abstream.config import Settings

TARGET_RATIO = 2.0
TARGET_HALF_P99_MS = 25.0
BARE_TOPIC = "bench.bare"


def bare_values(payloads: list[dict[str, Any]], tag: str) -> list[tuple[bytes, bytes]]:
    """The pool's events as single records: key = user, value = the event with its client context."""
    out = []
    for p in payloads:
        user = f"{p['anonymous_user_id']}.{tag}"
        ctx = {k: p[k] for k in ("session_id", "platform", "app_version", "install_id", "sent_at")}
        key = user.encode()
        for ev in p["events"]:
            out.append((key, orjson.dumps({"anonymous_user_id": user, **ctx, **ev})))
    return out


async def bare_producer(settings: Settings, values: list[tuple[bytes, bytes]], duration_s: float) -> dict[str, Any]:
    """One record per event, acks=all, the gateway's producer settings; events/s from first send to last ack."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from abstream.kafka import producer_settings

    topic = settings.topic(BARE_TOPIC)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            try:
                await admin.create_topics(
                    [NewTopic(topic, settings.kafka_partitions, settings.kafka_replication_factor)]
                )
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**producer_settings(settings))
    await producer.start()
    try:
        for key, value in values[:2000]:  # warm-up: metadata, connections, first batches
            await producer.send(topic, value, key=key)
        await producer.flush()
        window: deque[asyncio.Future[Any]] = deque()
        n = len(values)
        i = sent = 0
        start = time.perf_counter()
        t_start = time.monotonic()
        deadline = start + duration_s
        send = producer.send
        while True:
            key, value = values[i]
            i += 1
            if i == n:
                i = 0
            window.append(await send(topic, value, key=key))
            sent += 1
            if len(window) >= 50_000:
                await window.popleft()
            if not sent & 1023 and time.perf_counter() >= deadline:
                break
        await asyncio.gather(*window)
        elapsed = time.perf_counter() - start
        t_mid = (t_start + time.monotonic()) / 2
    finally:
        await producer.stop()
    return {
        "events": sent,
        "elapsed_s": elapsed,
        "events_per_s": sent / elapsed,
        "records_per_event": 1,
        "t_mid": t_mid,
    }


def _load_max(
    args: argparse.Namespace, url: str, pool: Path, gz: bool, wrk: str | None, duration: float
) -> dict[str, Any]:
    if wrk:
        return loadgen.run_wrk(
            url,
            pool,
            gzip_bodies=gz,
            duration_s=duration,
            threads=args.threads,
            connections=args.connections,
            wrk=wrk,
        )
    return loadgen.run_client(
        url, pool, rate=0, duration_s=duration, warmup_s=1.0, connections=args.connections, gzip_bodies=gz
    )


def _check(stack: loadgen.PrivateStack, result: dict[str, Any], what: str) -> dict[str, Any]:
    stack.check_alive()
    if result.get("duplicates"):
        print(f"warning: {what}: {result['duplicates']} events flagged as duplicates", file=sys.stderr)
    if result.get("ok", 0) == 0:
        raise RuntimeError(f"{what}: no request answered 200 ({result})")
    return result


def bare_at(bare_slices: list[dict[str, Any]], t: float) -> float:
    """The bare producer's events/s at time ``t``: linear between the two bare slices around it.

    The box's speed drifts (bare slices two minutes apart differed by up to 1.5x), so each gateway slice is
    compared with the bare producer measured just before and just after it, weighted by distance in time.
    """
    points = sorted((b["t_mid"], b["events_per_s"]) for b in bare_slices)
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in pairwise(points):
        if t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return points[-1][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abstream bench ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=3, help="max-rate rounds, each a gateway slice between two bare ones (default 3)"
    )
    parser.add_argument(
        "--slice", type=float, default=5.0, help="seconds of each max-rate slice, bare or gateway (default 5)"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each fixed-rate run (default 15)")
    parser.add_argument("--events", type=int, default=50, help="events per request (default 50)")
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        help="distinct request bodies per run (default: enough to outrun the dedup cache)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gateway server processes (ABSTREAM_GATEWAY_WORKERS; default: one per core, as in production)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections at max rate (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave cores to the gateway)")
    parser.add_argument("--half-connections", type=int, default=64, help="connections of the fixed-rate client")
    parser.add_argument("--half-rate", type=float, default=0.0, help="fixed rate in requests/s (default: max / 2)")
    parser.add_argument(
        "--half-client",
        choices=["auto", "c", "python"],
        default="auto",
        help="fixed-rate load client: auto (C when a compiler builds it, else asyncio), c, python",
    )
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto", help="max-rate load generator")
    parser.add_argument("--no-gzip", dest="gzip", action="store_false", help="skip the gzip runs")
    parser.add_argument("--out", type=Path, default=Path("bench-results/ingest.json"))
    parser.add_argument(
        "--profile", metavar="SVG", help="py-spy flame graph of the gateway during the first identity max slice"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the stack's logs (temp dir) after the run")
    loadgen.add_quiet_args(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.slice < 1 or args.duration < 1:
        parser.error("--rounds must be >= 1, --slice and --duration >= 1 second")

    import logging

    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    wrk = None
    if args.client in ("auto", "wrk"):
        wrk = loadgen.wrk_path()
        if wrk is None:
            print(f"wrk is not installed; install it with:  {loadgen.WRK_INSTALL}   (Debian/Ubuntu, as root)")
            if args.client == "wrk":
                return 2
            print("falling back to the Python asyncio client (closed loop): a lower bound of the gateway's rate")

    settings = Settings.from_env()
    # Each server process remembers up to dedup_cache_size ids and sees about 1/N of the traffic: the pool must
    # outrun every process's cache, or repeats are answered as duplicates (and not published).
    pool_events = int(settings.dedup_cache_size * 1.5 * max(1, args.gateway_workers))
    n_bodies = args.pool or max(1000, -(-pool_events // args.events))
    t0 = time.perf_counter()
    payloads = loadgen.make_v1_payloads(n_bodies, args.events)
    plain = loadgen.v1_body(payloads[0], "x")
    per_event = (len(plain) - len(orjson.dumps({**payloads[0], "events": []}))) / args.events
    print(
        f"pool: {n_bodies} requests x {args.events} events (~{per_event:.0f} bytes/event, {len(plain) / 1024:.1f} KiB "
        f"per request), generated in {time.perf_counter() - t0:.1f}s"
    )

    modes = ["identity", "gzip"] if args.gzip else ["identity"]
    results: dict[str, Any] = {mode: {"max_slices": []} for mode in modes}
    bare_slices: list[dict[str, Any]] = []
    gzip_ratio = None
    with loadgen.private_stack(keep_dir=args.keep_logs, gateway_workers=args.gateway_workers) as stack:
        s = stack.settings
        url = f"{stack.gateway_url}/v1/events"
        print(f"stack: tansu {s.kafka_bootstrap_servers}, gateway {stack.gateway_url} (pid {stack.gateway_pid})")

        def pool(tag: str, gz: bool) -> Path:
            bodies = [loadgen.v1_body(p, tag) for p in payloads]
            if gz:
                bodies = loadgen.gzip_all(bodies)
            return loadgen.write_pool(stack.work_dir / f"pool-{tag}.bin", bodies)

        # Every slice posts ids the gateway has not seen (its own tag); built before the slices, so that they
        # follow each other closely.
        print("writing request pools ...", flush=True)
        max_pools = {(m, r): pool(f"max-{m}-{r}", m == "gzip") for r in range(args.rounds) for m in modes}
        if "gzip" in modes:
            gz_pool = loadgen.read_pool(max_pools["gzip", 0])[:200]
            gzip_ratio = sum(len(loadgen.v1_body(x, "max-gzip-0")) for x in payloads[:200]) / sum(map(len, gz_pool))
        values = bare_values(payloads, "bare")
        # This process now holds ~650,000 objects of payloads; the bare producer's own garbage triggers full
        # collections that would traverse them all (~0.4 s each, ~4 per slice: measured 40-49k events/s
        # against 51-75k frozen). The gateway freezes its start-up heap the same way (gateway/app.py).
        gc.collect()
        gc.freeze()

        # warm-up (imports, caches, producer connections), not reported
        _check(stack, _load_max(args, url, pool("warm", False), False, wrk, 3), "warm-up")

        def run_bare(k: int) -> None:
            print(f"bare aiokafka producer, one record per event, slice {k + 1}, {args.slice:.0f}s ...", flush=True)
            with loadgen.measured_run(stack.pids(), args) as cpu:
                run = loadgen.run_async(bare_producer(s, values, args.slice))
            run["cpu"] = cpu.result
            bare_slices.append(run)

        # Max rate: bare, then each mode's gateway slice, then bare again, round after round (ABAB...A).
        run_bare(0)
        for r in range(args.rounds):
            for mode in modes:
                gz = mode == "gzip"
                print(f"gateway, {mode}, max rate, round {r + 1}/{args.rounds}, {args.slice:.0f}s ...", flush=True)
                profile = args.profile if mode == "identity" and r == 0 else None
                with (
                    loadgen.measured_run(stack.pids(), args) as cpu,
                    loadgen.py_spy(stack.gateway_pid, profile, args.slice),
                ):
                    start = time.monotonic()
                    res = _load_max(args, url, max_pools[mode, r], gz, wrk, args.slice)
                    res["t_mid"] = (start + time.monotonic()) / 2
                res["cpu"] = cpu.result
                results[mode]["max_slices"].append(_check(stack, res, f"{mode} max, round {r + 1}"))
            run_bare(r + 1)
        for mode in modes:
            for res in results[mode]["max_slices"]:
                res["bare_events_per_s"] = bare_at(bare_slices, res["t_mid"])
                res["ratio"] = res["events_per_s"] / res["bare_events_per_s"]
            results[mode]["max"] = median_slice(results[mode]["max_slices"])

        for mode in modes:
            gz = mode == "gzip"
            rate = args.half_rate or statistics.median(r["rps"] for r in results[mode]["max_slices"]) / 2
            p = pool(f"half-{mode}", gz)
            print(f"gateway, {mode}, fixed {rate:,.0f} requests/s (half of max), {args.duration:.0f}s ...", flush=True)
            with loadgen.measured_run(stack.pids(), args) as cpu:
                res = loadgen.run_client(
                    url,
                    p,
                    rate=rate,
                    duration_s=args.duration,
                    warmup_s=2.0,
                    connections=args.half_connections,
                    gzip_bodies=gz,
                    client=args.half_client,
                )
            res["cpu"] = cpu.result
            results[mode]["half"] = _check(stack, res, f"{mode} half")

        from abstream.kafka import producer_settings

        producer = {k: v for k, v in producer_settings(s).items() if k != "bootstrap_servers"}

    bare_eps = statistics.median(b["events_per_s"] for b in bare_slices)
    report = {
        "benchmark": "ingest",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": loadgen.machine(),
        "config": {
            "events_per_request": args.events,
            "bytes_per_event": round(per_event),
            "pool_requests": n_bodies,
            "gzip_ratio": gzip_ratio,
            "rounds": args.rounds,
            "slice_s": args.slice,
            "duration_s": args.duration,
            "max_client": f"wrk -t{args.threads} -c{args.connections}" if wrk else "python closed loop",
            "half_client": results[modes[0]]["half"]["client"],
            "gateway": f"{args.gateway_workers} process{'es' if args.gateway_workers > 1 else ''} "
            f"(abstream gateway, uvicorn) on {os.cpu_count()} cores",
            "producer_settings": producer,
        },
        "bare_producer": {"runs": bare_slices, "events_per_s": bare_eps},
        "gateway": results,
        "ratio_gateway_over_bare": {m: results[m]["max"]["ratio"] for m in modes},
    }
    bare_us = statistics.median(cpu_us_per_event(b["cpu"]["bench"], b["events_per_s"]) for b in bare_slices)
    report["cpu_ratio_gateway_over_bare"] = {
        m: bare_us
        / max(
            statistics.median(
                cpu_us_per_event(r["cpu"]["gateway"], r["events_per_s"]) for r in results[m]["max_slices"]
            ),
            1e-9,
        )
        for m in modes
    }
    half = results["identity"]["half"]["latency_ms"]["p99"]
    ratio = report["ratio_gateway_over_bare"]["identity"]
    report["targets"] = {
        "ratio": {"target": TARGET_RATIO, "value": ratio, "pass": ratio >= TARGET_RATIO},
        "half_rate_p99_ms": {"target": TARGET_HALF_P99_MS, "value": half, "pass": half <= TARGET_HALF_P99_MS},
    }
    print_report(report)
    loadgen.write_json(args.out, report)
    print(f"results written to {args.out}")
    return 0


def median_slice(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """The slice with the median ratio to the bare producer (the lower middle one for an even count)."""
    ranked = sorted(slices, key=lambda r: r["ratio"])
    return ranked[(len(ranked) - 1) // 2]


def cpu_us_per_event(cpu_pct: float, events_per_s: float) -> float:
    """CPU time the sender spent per acknowledged event: comparable even when other processes share the box."""
    return cpu_pct * 10_000 / events_per_s if events_per_s else 0.0


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    bare = report["bare_producer"]
    print()
    print(
        f"abstream bench ingest: {cfg['events_per_request']} events/request, ~{cfg['bytes_per_event']} B/event"
        + (f", gzip ratio {cfg['gzip_ratio']:.1f}x" if cfg["gzip_ratio"] else "")
        + f"; max: {cfg['max_client']}; half: {cfg['half_client']}; {cfg['gateway']}"
    )

    def gateway_row(name: str, rate: str, r: dict[str, Any]) -> list[object]:
        lat = r["latency_ms"]
        return [name, rate, r["rps"], r["events_per_s"], r.get("bare_events_per_s"), r.get("ratio")] + [
            lat["p50"],
            lat["p95"],
            lat["p99"],
            lat["p999"],
            lat["max"],
            loadgen.failures(r),
            r["cpu"]["gateway"],
            cpu_us_per_event(r["cpu"]["gateway"], r["events_per_s"]),
            r["cpu"]["gateway_runqueue_wait"],
            r["cpu"]["broker"],
            r["cpu"]["others"],
        ]

    rows: list[list[object]] = []
    gateway = report["gateway"]
    for i, run in enumerate(bare["runs"]):  # in the order they ran: bare, each mode's gateway slice, bare, ...
        c = run["cpu"]
        rows.append(
            [f"bare producer, 1 record/event, slice {i + 1}", "max", None, run["events_per_s"], None, None]
            + [None] * 5
            + [0, c["bench"], cpu_us_per_event(c["bench"], run["events_per_s"]), None, c["broker"], c["others"]]
        )
        for mode, runs in gateway.items():
            if i < len(runs["max_slices"]):
                rows.append(gateway_row(f"gateway /v1/events, {mode}, round {i + 1}", "max", runs["max_slices"][i]))
    for mode, runs in gateway.items():
        half = runs["half"]
        rows.append(gateway_row(f"gateway /v1/events, {mode}", f"fixed {half['offered_rps']:,.0f}/s", half))
    loadgen.print_table(
        ["run", "rate", "req/s", "events/s", "bare events/s then", "x bare", "p50 ms", "p95 ms", "p99 ms"]
        + ["p99.9 ms", "max ms", "errors", "CPU% sender", "sender CPU µs/event", "gateway waited for CPU %"]
        + ["CPU% broker", "CPU% other procs"],
        rows,
    )
    print("(CPU% of one core; 'sender' is the gateway, or this process for the bare producer; 'other procs' is")
    print(" whatever else ran on the machine meanwhile, and 'waited for CPU' the share of the run the gateway was")
    print(" ready to run but had no core: with much of either, the latencies are the machine's, not this code's)")
    print("('bare events/s then': the bare producer's rate interpolated to the middle of the gateway slice, between")
    print(" the bare slices just before and just after it; the box's speed drifts, so each slice has its own baseline)")
    print(f"bare producer: median of {len(bare['runs'])} slices {bare['events_per_s']:,.0f} events/s")
    for mode, ratio in report["ratio_gateway_over_bare"].items():
        slices = ", ".join(f"{r['ratio']:.2f}" for r in gateway[mode]["max_slices"])
        print(f"ratio gateway/bare, {mode}: {ratio:.2f}x (median of the rounds: {slices})")
    for mode, ratio in report["cpu_ratio_gateway_over_bare"].items():
        print(
            f"ratio of CPU per event, bare/gateway, {mode}: {ratio:.2f}x (the events/s ratio if each had a whole core)"
        )
    for name, t in report["targets"].items():
        verdict = "PASS" if t["pass"] else "MISS"
        op = ">=" if name == "ratio" else "<="
        print(f"target {name}: {t['value']:.2f} {op} {t['target']}  {verdict}")
    half = report["gateway"]["identity"]["half"]
    print(
        f"(half-rate identity: service time p99 {half['service_ms']['p99']:.2f} ms, client send lateness p99 "
        f"{half['send_lateness_ms']['p99']:.2f} ms)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
