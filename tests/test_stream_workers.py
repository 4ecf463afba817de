"""The stream workers through the real path: HTTP in, Kafka, Faust workers, ClickHouse out.

Each test gets its own topics and database (the `settings` fixture), runs migrations, and starts the
gateway and worker processes it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.devstack.ports import free_port
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy
from abstream.migrate import migrate
from stream_workers.verify import actual_totals, differences, expected_totals
from tests import oracle
from tests.stack import UNDER_LOAD, app_process, log_dir, rows, scalar, start_app, wait_for
from tests.test_dashboards import DASHBOARDS, panel_results

INGESTION_DASHBOARD = next(p for p in DASHBOARDS if p.name == "ingestion.json")


def assert_verify_clean(settings: Settings) -> None:
    """The rollups equal both recomputations from the raw rows: `abstream verify` (the workers' own per-user
    code replayed) and the independent oracle (tests/oracle.py: the documented rules, applied naively)."""
    actual = actual_totals(settings)
    diffs = differences(expected_totals(settings), actual)
    assert diffs == [], "\n".join(diffs[:20])
    diffs = oracle.differences(oracle.expected_totals(settings), actual)
    assert diffs == [], "independent oracle:\n" + "\n".join(diffs[:20])


def now_iso(offset_s: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).isoformat()


def post_events(base: str, user: str, names: list[str], ids: list[str] | None = None, **extra: Any) -> dict:
    events = [
        {"event_name": n, "occurred_at": now_iso(-60 + i), **({"event_id": ids[i]} if ids else {})}
        for i, n in enumerate(names)
    ]
    body = {"anonymous_user_id": user, "platform": "ios", "app_version": "1.2.0", "events": events, **extra}
    r = httpx.post(f"{base}/v1/events", json=body, timeout=15)
    assert r.status_code == 200, r.text
    return r.json()


def test_events_assignments_and_rollups_end_to_end(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(12)]
    variants: dict[str, dict[int, int]] = {}
    for user in users:
        for _ in range(2):  # a repeated assignment call is recorded once downstream
            r = httpx.post(f"{base}/v1/assignment", json={"anonymous_user_id": user, "platform": "ios",
                                                           "app_version": "1.2.0"}, timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text
        variants[user] = {a["experiment_id"]: a["variant_id"] for a in r.json()["assignments"]}
    funnel_steps = ["app_open", "workout_started", "session_submitted"]
    expected_events = Counter()
    for i, user in enumerate(users):
        names = funnel_steps[: 1 + i % 3] + ["app_open"] * (i % 2)
        post_events(base, user, names)
        expected_events.update(names)
    r = httpx.post(f"{base}/apiv1/ab-tests/3/track", json={"user_id": users[0], "metric_name": "revenue",
                                                             "value": 9.5}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    bad = httpx.post(
        f"{base}/v1/events",
        json={"anonymous_user_id": users[0], "events": [{"event_name": "bad name!", "occurred_at": now_iso()}]},
    )
    assert bad.status_code in (200, 400), bad.text
    refused = httpx.post(f"{base}/v1/events", json={"anonymous_user_id": users[0], "platform": "web", "events": []})
    assert refused.status_code == 400, refused.text
    total = sum(expected_events.values()) + 1
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == total, what="event_logs rows")
    wait_for(lambda: scalar(settings, "SELECT count() FROM rejected_events") == 2, what="rejected_events rows")
    assert sorted(rows(settings, "SELECT scope, code, field, user_id FROM rejected_events")) == [
        ("event", "invalid_event_name", "events.0.event_name", users[0]),
        ("request", "invalid_platform", "platform", users[0]),
    ]

    # the ingestion dashboard shows these very events (its panels' SQL, run as Grafana would)
    panels = panel_results(settings, INGESTION_DASHBOARD)
    assert panels["Accepted events"] == [{"accepted": total}]
    assert (panels["Rejected events"], panels["Refused requests"]) == ([{"rejected": 1}], [{"refused": 1}])
    assert panels["Rejection rate"][0]["rate"] == pytest.approx(1 / (total + 1))
    by_surface = Counter()
    for row in panels["Accepted events by surface"]:
        by_surface[row["surface"]] += row["events"]
    assert by_surface == {"v1": total - 1, "track": 1}
    assert {r["code"]: r["rejections"] for r in panels["Rejections by code"]} == {
        "invalid_event_name": 1,
        "invalid_platform": 1,
    }
    wrong = {
        (r["code"], r["scope"], r["field"]): (r["rejections"], r["users"]) for r in panels["What clients get wrong"]
    }
    assert wrong == {("invalid_event_name", "event", "events.0.event_name"): (1, 1),
                     ("invalid_platform", "request", "platform"): (1, 1)}  # fmt: skip
    raws = [r for (r,) in rows(settings, "SELECT raw FROM rejected_events")]
    assert raws and all(users[0] not in r for r in raws), "rejected bodies keep no user id in clear"
    latest = panels["Latest rejected payloads"]
    assert "bad name!" in next(r["raw"] for r in latest if r["code"] == "invalid_event_name")
    assert all("user_id" not in r for r in latest), "the payload table does not list user ids"
    lags = panels["Pipeline latency: gateway receive -> ClickHouse row"]
    assert lags and all(0 <= r["p50"] <= r["p95"] <= r["p99"] < 60 for r in lags)

    # assignments: exactly one row per (user, experiment), the variant the gateway answered
    got = rows(settings, "SELECT user_id, experiment_id, variant_id FROM assignments")
    assert sorted(got) == sorted((u, e, v) for u, m in variants.items() for e, v in m.items())

    # enrichment: every event of an assigned user carries its variants
    for user in users[:3]:
        maps = rows(settings, "SELECT DISTINCT experiment_map FROM event_logs FINAL WHERE user_id = {u:String} "
                              "AND kind = 'event'", u=user)  # fmt: skip
        assert len(maps) == 1
        assert set(maps[0][0]) == {"exp_3_landing_journey", "exp_4_achievements_density"}

    # experiment rollups: per variant, users and events of app_open
    def metric_rows() -> dict[int, tuple[int, int]]:
        return {v: (u, c) for v, u, c in rows(
            settings, "SELECT variant_id, users_with_metric, event_count FROM experiment_metric_rollups "
                      "WHERE experiment_id = 4 AND metric = 'app_open'")}  # fmt: skip

    expected_m: dict[int, list[int]] = {}
    for i, user in enumerate(users):
        v = variants[user][4]
        n_open = 1 + (i % 2)
        acc = expected_m.setdefault(v, [0, 0])
        acc[0] += 1
        acc[1] += n_open
    wait_for(lambda: metric_rows() == {v: tuple(x) for v, x in expected_m.items()}, what="experiment rollups")
    exposed = dict(rows(settings, "SELECT variant_id, sum(users) FROM experiment_exposures WHERE experiment_id = 4 "
                                  "GROUP BY variant_id"))  # fmt: skip
    assert exposed == dict(Counter(variants[u][4] for u in users))
    revenue = rows(settings, "SELECT variant_id, sum_x, n FROM experiment_metric_rollups "
                             "WHERE experiment_id = 3 AND metric = 'revenue'")  # fmt: skip
    assert revenue == [(variants[users[0]][3], 9.5, 1)]

    # daily rollups: totals per event name
    daily = dict(rows(settings, "SELECT event_name, events FROM daily_metric_rollups WHERE platform = '*'"))
    assert {k: v for k, v in daily.items() if k != "revenue"} == dict(expected_events)
    uniques = scalar(settings, "SELECT unique_users FROM daily_metric_rollups WHERE platform = '*' "
                               "AND event_name = 'app_open'")  # fmt: skip
    assert uniques == len(users)

    # funnel: users reaching each step (all users row)
    funnel = dict(rows(settings, "SELECT step, users FROM funnel_rollups WHERE experiment_id = 0"))
    assert funnel == {1: 12, 2: 8, 3: 4}
    assert scalar(settings, "SELECT count() FROM rollup_runs") > 0
    assert_verify_clean(settings)

    # ArkForge results: exposures per variant and metrics compared with the control
    r = httpx.get(f"{base}/apiv1/ab-tests/4/results", timeout=10)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["total_exposed_users"] == len(users)
    by_variant = {v["variant_id"]: v for v in res["variants"]}
    assert {k: v["exposed_users"] for k, v in by_variant.items() if v["exposed_users"]} == exposed
    # no metrics listed: every event name as a proportion and a count, from the cumulative rollups
    metrics = {m["key"]: {e["variant_id"]: e for e in m["variants"]} for m in res["metrics"]}
    for variant_id, (n_users, n_events) in expected_m.items():
        conversion, count = metrics["conversion:app_open"][variant_id], metrics["count:app_open"][variant_id]
        assert conversion["users_with_metric"] == n_users
        assert conversion["conversion_rate"] == n_users / exposed[variant_id]
        assert count["mean"] == pytest.approx(n_events / exposed[variant_id], rel=1e-12)
    assert [v["is_control"] for v in res["variants"]] == [True, False]
    comparison = next(e for e in res["metrics"][0]["variants"] if not e["is_control"])["vs_control"]
    assert comparison["reason"]["code"], "12 users are below the minimum sample: inference is refused, with a reason"
    assert res["exposure"]["rule"] == "first_assignment"
    assert httpx.get(f"{base}/apiv1/ab-tests/999/results").status_code == 404


def test_late_assignment_re_enriches_events_received_after_it(stack: tuple[Settings, str]) -> None:
    """An assignment made by another surface reaches the worker after an event received later than it."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from schemas.assignment_record import AssignmentRecord

    settings, base = stack
    late, early = f"late-{uuid.uuid4().hex[:6]}", f"early-{uuid.uuid4().hex[:6]}"
    assigned_at = int(time.time() * 1000) - 5_000
    post_events(base, late, ["app_open"])  # received after assigned_at
    post_events(base, early, ["app_open"])
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == 2, what="events")

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        for user, at in ((late, assigned_at), (early, int(time.time() * 1000) + 60_000)):
            record = AssignmentRecord(
                user_id=user, experiment_key="exp_4_achievements_density", experiment_id=4, variant_key="B",
                variant_id=4002, phase=1, assignment_version="test", assigned_at=at, surface="apiv1",
            )  # fmt: skip
            await producer.send_and_wait(settings.topic("assignments"), record.to_bytes(), key=user.encode())
        await producer.stop()

    asyncio.run(publish())
    wait_for(
        lambda: scalar(settings, "SELECT experiment_map['exp_4_achievements_density'] FROM event_logs FINAL "
                                 "WHERE user_id = {u:String}", u=late) == "B",
        what="re-enrichment",
    )  # fmt: skip
    # the other user's assignment came after its event was received: that event stays unenriched
    assert scalar(settings, "SELECT experiment_map FROM event_logs FINAL WHERE user_id = {u:String}", u=early) == {}
    wait_for(lambda: scalar(settings, "SELECT sum(users_with_metric) FROM experiment_metric_rollups "
                                      "WHERE experiment_id = 4") == 1, what="rollup moved")  # fmt: skip
    assert_verify_clean(settings)


def test_an_event_time_no_column_can_hold_does_not_stop_the_partition(stack: tuple[Settings, str]) -> None:
    """A record whose corrected time is year 0000 (a gateway without the sent_at window once wrote one) is stored at
    its receive time; before, its insert failed forever and every later event of the partition waited behind it."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    from gateway.ingest import ingest_v1
    from schemas.events import decode_record, encode_record

    settings, base = stack
    user = f"clock-{uuid.uuid4().hex[:6]}"
    now = int(time.time() * 1000)
    payload = {"anonymous_user_id": user, "events": [{"event_name": "app_open", "occurred_at": now - 1000}]}
    (published,) = ingest_v1(payload, now, settings).records
    record = decode_record(published.value)
    record["events"][0].update(sent_at="9999-12-31T23:59:59Z", skew_ms=now - 253_402_300_799_000)
    record["events"][0]["corrected_at_ms"] = now - 1000 + record["events"][0]["skew_ms"]

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        await producer.send_and_wait(settings.topic("events"), encode_record(record), key=user.encode())
        await producer.stop()

    asyncio.run(publish())
    post_events(base, user, ["workout_started"])  # same user, same partition: must not wait behind it
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL WHERE user_id = {u:String}", u=user) == 2,
             what="both events")  # fmt: skip
    (row,) = rows(settings, "SELECT toUnixTimestamp64Milli(event_time), toUnixTimestamp64Milli(received_at), "
                            "corrected_at, skew_ms FROM event_logs FINAL WHERE user_id = {u:String} "
                            "AND event_name = 'app_open'", u=user)  # fmt: skip
    assert row == (now, now, None, None)
    wait_for(lambda: scalar(settings, "SELECT sum(events) FROM daily_metric_rollups WHERE platform = '*' "
                                      "AND event_name = 'app_open'") == 1, what="rollup")  # fmt: skip
    assert_verify_clean(settings)


def test_tracked_values_that_cancel_leave_their_neighbours_intact(stack: tuple[Settings, str]) -> None:
    """User A tracks 9e15 then -9e15 next to user B's 5, in one partition and variant. In float totals, B's 25
    vanished into A's 8.1e31 and left with it: sum_x2 0, and verify disagreed with the raw log for good."""
    from aiokafka.partitioner import DefaultPartitioner

    settings, base = stack
    partitions = list(range(settings.kafka_partitions))

    def placed(user: str) -> tuple[int, int]:
        r = httpx.post(f"{base}/apiv1/ab-tests/3/assign", json={"user_id": user}, timeout=10)
        assert r.status_code == 200 and r.json()["assigned"], r.text
        return r.json()["variant_id"], DefaultPartitioner()(user.encode(), partitions, partitions)

    big = f"big-{uuid.uuid4().hex[:6]}"
    where = placed(big)
    small = next(u for u in (f"small-{uuid.uuid4().hex[:6]}" for _ in range(200)) if placed(u) == where)
    for user, value in ((small, 5), (big, 9e15), (big, -9e15)):
        r = httpx.post(f"{base}/apiv1/ab-tests/3/track", json={"user_id": user, "metric_name": "revenue",
                                                                 "value": value}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
    sql = ("SELECT users_with_metric, event_count, n, sum_x, sum_x2 FROM experiment_metric_rollups_by_partition "
           "FINAL WHERE experiment_id = 3 AND metric = 'revenue'")  # fmt: skip
    wait_for(lambda: [r[1] for r in rows(settings, sql)] == [3], what="the three tracked values")
    assert rows(settings, sql) == [(2, 3, 2, 5.0, 25.0)]
    assert_verify_clean(settings)


def test_client_retry_is_counted_once_across_gateways(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    user = f"retry-{uuid.uuid4().hex[:6]}"
    ids = [uuid.uuid4().hex for _ in range(3)]
    with app_process("gateway", settings, log_dir()) as other:
        post_events(base, user, ["app_open", "workout_started", "app_open"], ids)
        post_events(other.address, user, ["app_open", "workout_started", "app_open"], ids)
    # a later event of the same user (same partition, processed after the retry) marks the retry as done
    post_events(base, user, ["sentinel"], [uuid.uuid4().hex])
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL WHERE event_name = 'sentinel'") == 1,
             what="the sentinel event")  # fmt: skip
    wait_for(lambda: scalar(settings, "SELECT count() FROM daily_metric_rollups WHERE event_name = 'sentinel'") > 0,
             what="the sentinel rollup")  # fmt: skip
    assert scalar(settings, "SELECT count() FROM event_logs FINAL") == 4
    assert scalar(settings, "SELECT count() FROM event_logs") == 4  # not even a transient copy
    assert scalar(settings, "SELECT events FROM daily_metric_rollups WHERE platform = '*' "
                            "AND event_name = 'app_open'") == 2  # fmt: skip
    assert_verify_clean(settings)


class Load:
    """Posts batches of events for many users in a background thread; remembers what was acknowledged."""

    def __init__(self, base: str, rng: random.Random, users: int = 40, pause_s: float = 0.01) -> None:
        self.base = base
        self.pause_s = pause_s
        self.rng = rng
        self.users = [f"load-{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}" for _ in range(users)]
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def _run(self) -> None:
        names = ["app_open", "workout_started", "session_submitted", "screen_view"]
        with httpx.Client(timeout=15) as http:
            while not self.stop.is_set():
                rng = self.rng
                user = rng.choice(self.users)
                events = [{"event_name": rng.choice(names), "occurred_at": now_iso(-rng.randint(0, 3000)),
                           "event_id": uuid.UUID(int=rng.getrandbits(128)).hex}
                          for _ in range(rng.randint(1, 20))]  # fmt: skip
                try:
                    r = http.post(f"{self.base}/v1/events", json={"anonymous_user_id": user, "events": events})
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                if r.status_code == 200:
                    self.accepted += r.json()["accepted"] - r.json()["duplicates"]
                time.sleep(self.pause_s)

    def __enter__(self) -> Load:
        for user in self.users[::3]:
            httpx.post(f"{self.base}/v1/assignment", json={"anonymous_user_id": user}, timeout=10)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def start_worker(settings: Settings, name: str) -> Child:
    return start_app("worker", settings, log_dir(), name=name)


def sigkill(child: Child) -> None:
    assert child.proc is not None
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The random moments and traffic of a fault test, seeded and printed (shown with a failure's output):
    ABSTREAM_TEST_SEED=<seed> replays the same draws."""
    seed = int(os.environ.get("ABSTREAM_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{request.node.name}: ABSTREAM_TEST_SEED={seed}")
    return random.Random(seed)


@UNDER_LOAD
def test_sigkill_worker_repeatedly_loses_and_doubles_nothing(settings: Settings, rng: random.Random) -> None:
    migrate(settings, log=False)
    with ExitStack() as stack:
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        load = stack.enter_context(Load(gw.address, rng))
        worker = start_worker(settings, "victim")
        try:
            for _ in range(3):
                time.sleep(rng.uniform(3, 6))
                sigkill(worker)
                time.sleep(rng.uniform(0.2, 1.5))
                worker = start_worker(settings, "victim")
            time.sleep(2)
        finally:
            load.stop.set()
            load.thread.join(30)
        assert load.accepted > 0 and not load.errors
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == load.accepted, timeout=90,
                 what=f"{load.accepted} events in event_logs")  # fmt: skip
        time.sleep(1)
        assert scalar(settings, "SELECT count() FROM event_logs FINAL") == load.accepted
        assert scalar(settings, "SELECT count() - uniqExact(user_id, experiment_id) FROM assignments") == 0
        assert_verify_clean(settings)
        worker.stop()


@UNDER_LOAD
def test_two_workers_share_partitions_and_fail_over(settings: Settings, rng: random.Random) -> None:
    migrate(settings, log=False)
    with ExitStack() as stack:
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        first = start_worker(settings, "w1")
        second = start_worker(settings, "w2")
        with Load(gw.address, rng) as load:
            wait_for(lambda: scalar(settings, "SELECT uniqExact(worker) FROM rollup_runs") == 2, timeout=60,
                     what="both workers flushing")  # fmt: skip
            sigkill(first)
            time.sleep(8)
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == load.accepted, timeout=90,
                 what=f"{load.accepted} events in event_logs")  # fmt: skip
        assert_verify_clean(settings)
        second.stop()


@UNDER_LOAD
def test_clickhouse_outage_delays_but_loses_nothing(settings: Settings, tmp_path: Path, rng: random.Random) -> None:
    """A private ClickHouse endpoint is stopped under load, then restarted on the same data: the worker was
    writing before, wrote nothing while it was away (and did not crash), and caught up after."""
    from dataclasses import replace

    port = free_port()

    def endpoint() -> Child:
        child = Child("clickhouse", abstream_argv("clickhouse-local", "--port", str(port), "--path",
                                                  str(tmp_path / "ch")),
                      f"http://127.0.0.1:{port}", lambda: http_ok(f"http://127.0.0.1:{port}/ping"),
                      log_path=log_dir() / f"ch-{port}.log")  # fmt: skip
        child.start({})
        wait_healthy(child, 60)
        return child

    ch = endpoint()
    settings = replace(settings, clickhouse_url=f"http://default:@127.0.0.1:{port}")
    migrate(settings, log=False)
    with ExitStack() as stack:
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        worker = start_worker(settings, "ch-outage")
        with Load(gw.address, rng) as load:
            wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs") > 0, what="the worker writing")
            time.sleep(1)
            ch.stop()
            stopped_at = time.time()  # from here on nothing can be written
            accepted_at_stop = load.accepted
            time.sleep(8)
            assert load.accepted > accepted_at_stop, "the gateway keeps accepting: Kafka holds the events"
            assert worker.alive(), "the worker must not crash while ClickHouse is away"
            restarted_at = time.time()  # nothing written before this either
            ch = endpoint()
            time.sleep(2)
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == load.accepted, timeout=90,
                 what=f"{load.accepted} events in event_logs")  # fmt: skip
        runs = "SELECT count() FROM rollup_runs WHERE toUnixTimestamp64Milli(run_at) "
        paused = scalar(settings, runs + "BETWEEN {a:Int64} AND {b:Int64}", a=int(stopped_at * 1000),
                        b=int(restarted_at * 1000))  # fmt: skip
        assert paused == 0, "no flush can land while ClickHouse is away"
        after = scalar(settings, runs + ">= {b:Int64}", b=int(restarted_at * 1000))
        assert after > 0, "the worker flushes again once ClickHouse is back"
        assert_verify_clean(settings)
        worker.stop()
    ch.stop()


@UNDER_LOAD
def test_worker_killed_with_assignments_unwritten_writes_them_after_restart(settings: Settings, tmp_path: Path) -> None:
    """The worker has applied assignments (and its Faust table's changelog holds them) but ClickHouse is away, so
    their rows are not written; it is SIGKILLed. The restarted worker replays them from its checkpoint and must
    still write every row: the table's copy must not make it take them for already written (found by
    `abstream chaos`: assignments answered 200 but missing from the table, exposures above the raw rows).
    One experiment starts a new phase meanwhile, so each user also has a phase-1 assignment that the table no
    longer holds (it keeps the phase-2 one): its row must be written too."""
    from dataclasses import replace

    port = free_port()

    def endpoint() -> Child:
        child = Child("clickhouse", abstream_argv("clickhouse-local", "--port", str(port), "--path",
                                                  str(tmp_path / "ch")),
                      f"http://127.0.0.1:{port}", lambda: http_ok(f"http://127.0.0.1:{port}/ping"),
                      log_path=log_dir() / f"ch-{port}.log")  # fmt: skip
        child.start({})
        wait_healthy(child, 60)
        return child

    ch = endpoint()
    settings = replace(settings, clickhouse_url=f"http://default:@127.0.0.1:{port}")
    migrate(settings, log=False)
    users = [f"unwritten-{i}" for i in range(30)]
    with ExitStack() as stack:
        stack.callback(lambda: ch.stop())  # whichever endpoint runs last, also on a failure
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        worker = start_worker(settings, "unwritten")
        stack.callback(lambda: worker.stop())  # whichever worker runs last, also on a failure
        answered: set[tuple[str, int, int]] = set()  # (user, experiment, phase): one row each

        def assign(user: str) -> dict[int, int]:
            r = httpx.post(f"{gw.address}/v1/assignment", json={"anonymous_user_id": user}, timeout=10)
            assert r.status_code == 200, r.text
            phases = {a["experiment_id"]: a["phase"] for a in r.json()["assignments"]}
            answered.update((user, e, p) for e, p in phases.items())
            return phases

        exp_id = min(assign("unwritten-warmup"))
        wait_for(lambda: scalar(settings, "SELECT count() FROM assignments") > 0, what="the worker writing")
        ch.stop()
        for user in users:
            assign(user)
        token = settings.admin_token
        r = httpx.patch(f"{gw.address}/apiv1/ab-tests/{exp_id}", json={"new_phase": True}, timeout=10,
                        headers={"authorization": f"Bearer {token}"} if token else {})  # fmt: skip
        assert r.status_code == 200, r.text
        wait_for(lambda: assign(users[0]).get(exp_id) == 2, what="the new phase at the gateway")
        for user in users:
            assign(user)
            # after the user's phase-2 assignment (events between the phases: the test of phases below)
            post_events(gw.address, user, ["app_open"])
        time.sleep(4)  # applied, the table's changelog sent; the flush waits for ClickHouse
        sigkill(worker)
        ch = endpoint()
        worker = start_worker(settings, "unwritten")
        want = len(answered)
        assert len({(u, e) for u, e, _ in answered}) < want, "users with assignments of two phases"
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == len(users), timeout=90,
                 what="the events in event_logs")  # fmt: skip
        count = "SELECT count() FROM assignments"
        with contextlib.suppress(AssertionError):  # the assertion below says how many
            wait_for(lambda: scalar(settings, count) == want, timeout=30, what="the assignment rows")
        time.sleep(1)
        assert scalar(settings, count) == want
        assert_verify_clean(settings)
        worker.stop()
    ch.stop()


@UNDER_LOAD
def test_checkpoint_behind_the_committed_offsets_loses_nothing(settings: Settings, rng: random.Random) -> None:
    """Faust starts each partition at Kafka's committed offset; the worker resumes at its ClickHouse checkpoint.
    Here the checkpoints are moved back (to the same records, half as far) so Faust starts past them, under
    steady load: every record between the checkpoint and where Faust starts must still be applied, once (found
    by `abstream chaos`: the seek back was undone by records in flight and two partitions stayed stuck)."""
    import asyncio

    from faust.types import TP

    from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS
    from stream_workers.checkpoints import CHECKPOINT_COLUMNS, checkpoint_row, record_at

    topics = [settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_ASSIGNMENTS)]

    def move_checkpoints_back() -> int:
        saved = rows(settings, "SELECT topic, kafka_partition, kafka_offset FROM stream_checkpoints FINAL "
                               "WHERE topic IN {t:Array(String)}", t=topics)  # fmt: skip
        moved = []
        for topic, partition, offset in saved:
            if offset >= 2:
                found = asyncio.run(record_at(settings, TP(topic, partition), offset // 2))
                assert found is not None and found[0] == offset // 2
                moved.append([*checkpoint_row(topic, partition, found[0], found[1])[:-1], datetime.now(UTC)])
        c = ch_client(settings)
        try:
            c.insert("stream_checkpoints", moved, column_names=CHECKPOINT_COLUMNS)
        finally:
            c.close()
        return len(moved)

    migrate(settings, log=False)
    with ExitStack() as stack:
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        worker = start_worker(settings, "behind")
        stack.callback(lambda: worker.stop())  # whichever worker runs last, also on a failure
        load = stack.enter_context(Load(gw.address, rng, pause_s=0.003))
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs") > 2000, what="the worker writing")
        worker.stop()  # its acknowledged offsets are committed: as far as its checkpoints
        assert move_checkpoints_back() > 0
        time.sleep(4)  # records pile up in Kafka only
        worker = start_worker(settings, "behind")
        time.sleep(6)
        load.stop.set()
        load.thread.join(30)
        assert load.accepted > 0 and not load.errors
        count = "SELECT count() FROM event_logs FINAL"
        with contextlib.suppress(AssertionError):  # the assertion below says how many
            wait_for(lambda: scalar(settings, count) == load.accepted, timeout=60, what="every event")
        assert scalar(settings, count) == load.accepted
        assert scalar(settings, "SELECT count() - uniqExact(user_id, experiment_id) FROM assignments") == 0
        assert_verify_clean(settings)
        worker.stop()


def test_fill_gap_reads_a_range_in_order_in_batches_and_never_ends_it_short(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's direct read of the records between its checkpoint and the consumer's position: every
    offset of the range once and in order, in more than one batch (never the whole gap in memory). A read
    that stalls (no record: the broker away, or a range past the log's end) is never taken for the end of
    the range: it is tried again for as long as the partition is the worker's, then answers False."""
    import asyncio
    from dataclasses import replace

    from aiokafka import AIOKafkaProducer
    from faust.types import TP

    from abstream.kafka import producer_settings
    from stream_workers import checkpoints

    monkeypatch.setattr(checkpoints, "GAP_STALL_S", 1.0)
    topic = settings.topic(f"gap-{uuid.uuid4().hex[:6]}")
    pad = os.urandom(5000)  # 3,000 records of 5 kB that do not compress: more than one batch

    async def produce() -> None:
        producer = AIOKafkaProducer(**producer_settings(settings))
        await producer.start()
        try:
            futures = [await producer.send(topic, b"%d:" % i + pad, key=b"k", partition=0) for i in range(3000)]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    async def fill(s: Settings, start: int, end: int, owned_for_s: float = 60) -> tuple[bool, list[int], int]:
        offsets: list[int] = []
        batches = 0
        until = time.monotonic() + owned_for_s

        def apply(offset: int, value: bytes) -> None:
            assert value == b"%d:" % offset + pad
            offsets.append(offset)

        async def after_batch() -> None:
            nonlocal batches
            batches += 1

        ok = await checkpoints.fill_gap(s, TP(topic, 0), start, end, apply, lambda: time.monotonic() < until,
                                        after_batch)  # fmt: skip
        return ok, offsets, batches

    asyncio.run(produce())
    ok, offsets, batches = asyncio.run(fill(settings, 100, 2900))
    assert ok and offsets == list(range(100, 2900)) and batches > 1
    ok, offsets, _ = asyncio.run(fill(settings, 2990, 3000))
    assert ok and offsets == list(range(2990, 3000))
    # past the log's end: what is there is applied, the rest waited for (not skipped) while owned
    ok, offsets, _ = asyncio.run(fill(settings, 2990, 3100, owned_for_s=4))
    assert not ok and offsets == list(range(2990, 3000))
    away = replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    ok, offsets, _ = asyncio.run(fill(away, 0, 10, owned_for_s=3))
    assert not ok and offsets == []


def test_embedded_broker_restart_keeps_registry_and_loses_no_new_events(settings: Settings) -> None:
    """`abstream dev` restarted: a fresh in-memory broker (topics from offset 0), ClickHouse kept."""
    from dataclasses import replace

    from abstream.devstack.broker import start_broker, stop_process

    port = free_port()
    settings = replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")
    migrate(settings, log=False)
    first_users = [f"before-{i}" for i in range(6)]
    broker = start_broker("127.0.0.1", port)
    try:
        with app_process("gateway", settings, log_dir()) as gw, app_process("worker", settings, log_dir()):
            created = httpx.post(f"{gw.address}/apiv1/ab-tests", json={
                "test_name": "restart_probe", "variants": [{"variant_name": "a"}, {"variant_name": "b"}]})  # fmt: skip
            assert created.status_code == 201, created.text
            for user in first_users:
                post_events(gw.address, user, ["app_open"] * 5)
            wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == 30, what="first events")
            wait_for(lambda: scalar(settings, "SELECT count() FROM experiments FINAL WHERE name = 'restart_probe'"),
                     what="registry copy")  # fmt: skip
    finally:
        stop_process(broker)
    broker = start_broker("127.0.0.1", port)  # empty again
    try:
        with app_process("gateway", settings, log_dir()) as gw, app_process("worker", settings, log_dir()):
            listed = httpx.get(f"{gw.address}/apiv1/ab-tests").json()
            assert {t["test_name"]: t["id"] for t in listed}.get("restart_probe") == created.json()["id"]
            for user in first_users[:2]:  # fewer records than before: new offsets stay below the old ones
                post_events(gw.address, user, ["workout_started"] * 2)
            wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == 34, what="new events")
            time.sleep(1)
            assert scalar(settings, "SELECT count() FROM event_logs FINAL") == 34
            assert_verify_clean(settings)
    finally:
        stop_process(broker)


def test_the_oracle_and_verify_catch_a_wrong_rollup(stack: tuple[Settings, str]) -> None:
    """Both recomputations must be able to fail: a rollup row overwritten with a wrong count is flagged by each."""
    settings, base = stack
    user = f"o-{uuid.uuid4().hex[:6]}"
    assert httpx.post(f"{base}/v1/assignment", json={"anonymous_user_id": user}, timeout=10).status_code == 200
    post_events(base, user, ["app_open", "app_open", "workout_started"])
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == 3, what="events")
    wait_for(lambda: scalar(settings, "SELECT sum(users) FROM user_last_active") == 1, what="rollups")
    time.sleep(1)
    assert_verify_clean(settings)
    c = ch_client(settings)
    try:
        (row,) = c.query("SELECT day, event_name, platform, app_version, kafka_partition, events, unique_users, "
                         "version FROM daily_metric_rollups_by_partition FINAL WHERE event_name = 'app_open' "
                         "AND platform = '*'").result_rows  # fmt: skip
        c.insert("daily_metric_rollups_by_partition", [[*row[:5], row[5] + 1, row[6], row[7] + 1]],
                 column_names=["day", "event_name", "platform", "app_version", "kafka_partition", "events",
                               "unique_users", "version"])  # fmt: skip
    finally:
        c.close()
    actual = actual_totals(settings)
    assert len(differences(expected_totals(settings), actual)) == 1
    (diff,) = oracle.differences(oracle.expected_totals(settings), actual)
    assert "app_open" in diff and "[2.0, 1.0]" in diff and "[3.0, 1.0]" in diff


def test_arkforge_events_reach_event_logs_and_the_rollups(stack: tuple[Settings, str]) -> None:
    """/apiv1/events and /apiv1/events/batch (the ArkForge seed's shapes) end to end: stored once each, with the
    seed's fields mapped, enriched with the user's assignment, counted in the rollups."""
    settings, base = stack
    user = f"ark-{uuid.uuid4().hex[:6]}"
    r = httpx.post(f"{base}/apiv1/ab-tests/4/assign", json={"user_id": user}, timeout=10)
    assert r.status_code == 200 and r.json()["assigned"], r.text
    one = {"event_type": "button_click", "user_id": user, "session_id": "s-1",
           "properties": {"button_name": "submit", "page": "homepage"}}  # fmt: skip
    r = httpx.post(f"{base}/apiv1/events", json=one, timeout=10)
    assert r.status_code == 200, r.text
    batch = [{"event_type": "page_view", "user_id": user, "properties": {"page": f"/p{i}"}} for i in range(3)]
    r = httpx.post(f"{base}/apiv1/events/batch", json=batch, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    sql = ("SELECT event_name, surface, session_id, JSONExtractString(properties, 'page'), "
           "experiment_map['exp_4_achievements_density'] FROM event_logs FINAL WHERE user_id = {u:String} "
           "ORDER BY event_name, JSONExtractString(properties, 'page')")  # fmt: skip
    wait_for(lambda: len(rows(settings, sql, u=user)) == 4, what="the ArkForge events in event_logs")
    got = rows(settings, sql, u=user)
    variant = r.json().get("variant_key") or rows(settings, "SELECT variant_key FROM assignments WHERE user_id = "
                                                            "{u:String}", u=user)[0][0]  # fmt: skip
    assert got[0][:4] == ("button_click", "apiv1", "s-1", "homepage")
    assert [g[3] for g in got[1:]] == ["/p0", "/p1", "/p2"] and {g[0] for g in got[1:]} == {"page_view"}
    assert {g[4] for g in got} == {variant}, "enriched with the user's assignment"
    wait_for(lambda: scalar(settings, "SELECT sum(events) FROM daily_metric_rollups WHERE platform = '*' "
                                      "AND event_name = 'page_view'") == 3, what="the daily rollup")  # fmt: skip
    assert_verify_clean(settings)


def test_sigterm_writes_what_is_buffered_and_stops_promptly(settings: Settings) -> None:
    """A stopped worker writes its buffered rows, acknowledges their records and leaves; it does not sit in
    Faust's wait for acknowledgements until its supervisor's SIGKILL. The flush timer is set to a minute, so
    at the SIGTERM every row is still buffered and only the stop can write it."""
    import asyncio

    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    slow = dataclasses.replace(settings, worker_flush_interval_s=60.0)
    migrate(slow, log=False)
    with app_process("gateway", slow, log_dir()) as gw:
        worker = start_worker(slow, "stopped")
        try:
            wait_for(lambda: http_ok(f"{worker.address}/ready"), timeout=60, what="worker positioned")
            users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(10)]
            for user in users:
                post_events(gw.address, user, ["app_open", "workout_started"])
            time.sleep(3)  # consumed and buffered
            assert scalar(slow, "SELECT count() FROM event_logs") == 0, "the flush timer must not have run yet"
            started = time.monotonic()
            worker.stop(timeout=30)
            stop_s = time.monotonic() - started
        finally:
            worker.stop()
    assert worker.proc is not None and worker.proc.returncode != -signal.SIGKILL
    assert stop_s < 10, f"the worker took {stop_s:.1f} s to stop"
    assert scalar(slow, "SELECT count() FROM event_logs FINAL") == 20
    assert_verify_clean(slow)

    async def lag() -> int:
        group = f"{slow.kafka_topic_prefix}abstream-workers"
        consumer = AIOKafkaConsumer(bootstrap_servers=slow.kafka_bootstrap_servers, group_id=group,
                                    enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        try:
            tps = [TopicPartition(slow.topic("events"), p) for p in range(slow.kafka_partitions)]
            ends = await consumer.end_offsets(tps)
            return sum([ends[tp] - (await consumer.committed(tp) or 0) for tp in tps])
        finally:
            await consumer.stop()

    assert asyncio.run(lag()) == 0, "the written records are committed"


def test_a_new_phase_counts_from_its_own_assignments_whatever_order_the_worker_reads(settings: Settings) -> None:
    """Each user's events before a new phase stay the old phase's: the new phase's results count only events
    received from the user's phase-2 assignment on, also for users who draw the same variant again, and an
    event received between the new phase and the user's phase-2 assignment is attributed to the phase-1
    variant (per-day rollups, event_logs), whichever of the two topics the worker reads first. The phase-2
    part is sent while the worker is stopped, so it reads both topics' backlog at once on its start."""
    migrate(settings, log=False)
    users = [f"phase-{uuid.uuid4().hex[:8]}" for _ in range(30)]
    token = settings.admin_token
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with ExitStack() as stack:
        gw = stack.enter_context(app_process("gateway", settings, log_dir()))
        worker = start_worker(settings, "phases")
        stack.callback(lambda: worker.stop())
        base = gw.address
        r = httpx.post(f"{base}/apiv1/ab-tests", headers=headers, timeout=10, json={
            "test_name": f"phases {uuid.uuid4().hex[:6]}", "metrics": [{"key": "opens", "type": "count",
                                                                       "event": "app_open"}],
            "variants": [{"variant_name": "a", "weight": 1}, {"variant_name": "b", "weight": 1}]})  # fmt: skip
        assert r.status_code == 201, r.text
        test_id = r.json()["id"]

        def assign(user: str) -> int:
            r = httpx.post(f"{base}/apiv1/ab-tests/{test_id}/assign", json={"user_id": user}, timeout=10)
            assert r.status_code == 200 and r.json()["assigned"], r.text
            return int(r.json()["variant_id"])

        def open_app(user: str) -> str:
            event_id = str(uuid.uuid4())
            body = {"event_type": "app_open", "user_id": user, "event_id": event_id}
            assert httpx.post(f"{base}/apiv1/events", json=body, timeout=10).status_code in (200, 201, 202)
            return event_id

        phase1 = {u: assign(u) for u in users}
        for u in users:
            open_app(u)
            open_app(u)
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == 60, what="phase-1 events")
        r = httpx.patch(f"{base}/apiv1/ab-tests/{test_id}", json={"new_phase": True}, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        worker.stop()
        between = {u: open_app(u) for u in users}  # the new phase has begun, the user is not assigned in it yet
        phase2 = {u: assign(u) for u in users}
        after = {u: open_app(u) for u in users[::3]}
        worker = start_worker(settings, "phases")
        want = 60 + len(between) + len(after)
        wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == want, timeout=60,
                 what="every event in event_logs")  # fmt: skip
        time.sleep(2)
        assert sum(phase1[u] == phase2[u] for u in users) > 0, "some users drew the same variant again"

        enriched = {
            event_id: [(a["variant_id"], a["phase"]) for a in orjson.loads(stored) if a["experiment_id"] == test_id]
            for event_id, stored in rows(settings, "SELECT event_id, assignments FROM event_logs FINAL")
        }
        for u in users:
            assert enriched[between[u]] == [(phase1[u], 1)], (u, "between the phases", enriched[between[u]])
            if u in after:
                assert enriched[after[u]] == [(phase2[u], 2)], (u, "after", enriched[after[u]])

        body = httpx.get(f"{base}/apiv1/ab-tests/{test_id}/results", timeout=10).json()
        opens = next(m for m in body["metrics"] if m["key"] == "opens")
        for v in opens["variants"]:
            in_variant = [u for u in users if phase2[u] == v["variant_id"]]
            assert v["exposed_users"] == len(in_variant)
            want_mean = sum(u in after for u in in_variant) / len(in_variant)
            assert v["mean"] == pytest.approx(want_mean), (v["variant_key"], v["mean"], want_mean)
        assert_verify_clean(settings)
