"""Ingestion-core throughput: events/s of decode + validate + stamp + encode records, in one process.

A benchmark, not a timed test (``python -m abstream.bench.validation``): timing assertions flake on shared
CI machines. Each request is a realistic ``POST /v1/events`` body of 50 events of ~300 bytes with client
event_ids (all distinct, so the dedup cache is consulted and nothing is skipped); the loop does what a
route does around Kafka: ``decode_body`` -> ``ingest_v1`` -> ``acknowledge`` -> serialise the answer.
``--compare`` also runs the same work with the pydantic models of ``schemas/events.py`` validating each
event (``V1Event.model_validate``), the figure behind the choice of a hand-tuned hot path.
Budget: <= ~3 µs per event (>= ~330,000 events/s per process) so that the gateway reaches ~140,000
events/s on two cores with HTTP and Kafka on top.
"""

from __future__ import annotations

import argparse
import gzip
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from abstream.config import Settings
from gateway.body import decode_body
from gateway.dedup import DedupCache
from gateway.ingest import ingest_apiv1_batch, ingest_v1
from schemas.events import V1Event, V1EventsRequest

_SCREENS = ["home", "workout_summary", "creature_detail", "shop", "settings", "achievements"]
_NAMES = ["session_submitted", "screen_viewed", "workout_started", "creature_fed", "purchase_completed"]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(rng: random.Random, now_ms: int, i: int) -> dict[str, Any]:
    """One ~300-byte Calicritters event, the shape the seed's mobile client sends."""
    return {
        "event_name": rng.choice(_NAMES),
        "occurred_at": _iso(now_ms - rng.randint(0, 600_000)),
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "properties": {
            "screen": rng.choice(_SCREENS),
            "workout_id": f"w_{rng.randint(1, 99999)}",
            "duration_ms": rng.randint(100, 900_000),
            "creature": "sprout",
            "score": round(rng.random() * 100, 2),
            "streak": i % 30,
        },
        "context": {"locale": "en-US", "timezone": "Europe/Berlin", "network": "wifi"},
    }


def make_v1_body(rng: random.Random, now_ms: int, n_events: int) -> bytes:
    user = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return orjson.dumps(
        {
            "anonymous_user_id": user,
            "session_id": f"s_{rng.getrandbits(40):x}",
            "platform": rng.choice(["ios", "android"]),
            "app_version": "1.4.2",
            "install_id": f"i_{rng.getrandbits(40):x}",
            "sent_at": _iso(now_ms - 200),
            "events": [make_event(rng, now_ms, i) for i in range(n_events)],
        }
    )


def make_apiv1_body(rng: random.Random, now_ms: int, n_events: int, n_users: int = 5) -> bytes:
    users = [f"user_{rng.getrandbits(32)}" for _ in range(n_users)]
    events = []
    for i in range(n_events):
        ev = make_event(rng, now_ms, i)
        events.append(
            {
                "event_type": ev["event_name"],
                "user_id": users[i % n_users],
                "session_id": "session456",
                "properties": ev["properties"],
                "occurred_at": ev["occurred_at"],
                "event_id": ev["event_id"],
            }
        )
    return orjson.dumps(events)


class _Envelope(BaseModel):
    """The comparison's envelope: context validated by pydantic, events left to per-event validation."""

    anonymous_user_id: str
    session_id: str | None = None
    platform: str | None = None
    app_version: str | None = None
    install_id: str | None = None
    sent_at: str | int | None = None
    events: list[Any]


def pydantic_v1(payload: Any, received_at_ms: int, settings: Settings) -> list[bytes]:
    """The same rules through pydantic (V1Event per event, so one bad event does not sink the batch)."""
    from schemas.events import timestamp_ms

    env = _Envelope.model_validate(payload)
    skew = None if env.sent_at is None else received_at_ms - timestamp_ms(env.sent_at)
    future, age = settings.max_future_skew_s * 1000, settings.max_event_age_s * 1000
    out, rejected = [], []
    for i, raw in enumerate(env.events):
        try:
            ev = V1Event.model_validate(raw)
        except ValidationError as exc:
            rejected.append((i, exc.errors()[0]["type"]))
            continue
        ms = timestamp_ms(ev.occurred_at)
        if ms - received_at_ms > future or received_at_ms - ms > age:
            rejected.append((i, "window"))
            continue
        out.append(
            {
                "event_id": ev.event_id or uuid.uuid4().hex,
                "event_id_source": "client" if ev.event_id else "server",
                "kind": "event",
                "event_name": ev.event_name,
                "occurred_at": ev.occurred_at,
                "occurred_at_ms": ms,
                "sent_at": env.sent_at,
                "skew_ms": skew,
                "corrected_at_ms": None if skew is None else ms + skew,
                "session_id": env.session_id,
                "platform": env.platform,
                "app_version": env.app_version,
                "install_id": env.install_id,
                "experiment_id": None,
                "metric_name": None,
                "value": None,
                "properties": ev.properties or {},
                "context": ev.context or {},
            }
        )
    record = {"v": 1, "user_id": env.anonymous_user_id, "surface": "v1", "received_at_ms": received_at_ms}
    record["events"] = out
    return [orjson.dumps(record)]


def _measure(label: str, bodies: list[bytes], step: Callable[[bytes], object], n_events: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for body in bodies:
            step(body)
        best = min(best, time.perf_counter() - start)
    rate = len(bodies) * n_events / best
    print(f"{label:58s} {rate:>12,.0f} events/s  {1e6 / rate:6.2f} µs/event")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abstream.bench.validation", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="distinct request bodies per run")
    parser.add_argument("--events", type=int, default=50, help="events per request")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--compare", action="store_true", help="also time the pydantic-per-event variant")
    args = parser.parse_args(argv)

    settings = Settings()
    rng = random.Random(42)
    now_ms = time.time_ns() // 1_000_000
    v1 = [make_v1_body(rng, now_ms, args.events) for _ in range(args.requests)]
    v1_gz = [gzip.compress(b, 6) for b in v1]
    ark = [make_apiv1_body(rng, now_ms, args.events) for _ in range(args.requests)]
    avg = sum(map(len, v1)) / len(v1) / args.events
    ratio = sum(map(len, v1)) / sum(map(len, v1_gz))
    print(f"{args.requests} requests x {args.events} events, ~{avg:.0f} bytes/event as JSON, gzip ratio {ratio:.1f}x")

    def core(ctype: str, encoding: str | None, ingest: Callable[..., Any]) -> Callable[[bytes], object]:
        def step(body: bytes) -> object:
            cache = caches[0]
            result = ingest(decode_body(ctype, encoding, body, settings), now_ms, settings, cache)
            result.acknowledge(cache)
            return orjson.dumps(result.body())

        return step

    caches = [DedupCache(settings.dedup_cache_size)]

    def fresh(step: Callable[[bytes], object]) -> Callable[[bytes], object]:
        # Every run starts with an empty cache: the same bodies must not turn into duplicates on repeat.
        def wrapped(body: bytes) -> object:
            if body is first[0]:
                caches[0] = DedupCache(settings.dedup_cache_size)
            return step(body)

        return wrapped

    first = [v1[0]]
    _measure(
        "v1 /v1/events, identity (route work: +dedup, ack, answer)",
        v1,
        fresh(core("application/json", None, ingest_v1)),
        args.events,
        args.repeat,
    )
    first[0] = v1_gz[0]
    _measure(
        "v1 /v1/events, gzip (route work: +dedup, ack, answer)",
        v1_gz,
        fresh(core("application/json", "gzip", ingest_v1)),
        args.events,
        args.repeat,
    )
    first[0] = ark[0]
    _measure(
        "apiv1 /apiv1/events/batch, 5 users/request, identity",
        ark,
        fresh(core("application/json", None, ingest_apiv1_batch)),
        args.events,
        args.repeat,
    )
    first[0] = b""
    _measure("orjson.loads alone (the floor)", v1, orjson.loads, args.events, args.repeat)
    if args.compare:
        print("-- same work (decode + validate + stamp + encode records), hand-tuned vs pydantic:")

        def hand(body: bytes) -> object:
            return ingest_v1(decode_body("application/json", None, body, settings), now_ms, settings).records

        def pyd(body: bytes) -> object:
            return pydantic_v1(orjson.loads(body), now_ms, settings)

        def pyd_whole(body: bytes) -> object:
            # The cheapest pydantic can be: one call for the whole batch (all-or-nothing, no stamping).
            return V1EventsRequest.model_validate_json(body)

        _measure("hand-tuned core (gateway/ingest.py)", v1, hand, args.events, args.repeat)
        _measure("pydantic V1Event.model_validate per event", v1, pyd, args.events, args.repeat)
        _measure(
            "pydantic V1EventsRequest.model_validate_json, validation only", v1, pyd_whole, args.events, args.repeat
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
