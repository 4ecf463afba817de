"""End-to-end: event ingestion through real HTTP against a running `abstream gateway`, read back from Kafka.

Issue 5's gateway side, checked the way its "How it will be checked" section says: each contract of both seeds
through HTTP (mixed batches, gzip, every limit with its boundary on both sides), then the accepted events READ
BACK from the real ``events`` topic (tansu) and compared field by field with what was posted plus the server's
stamps, the rejected ones from ``events.rejected``; the broker stopped and started under a running gateway on
a private broker; and /openapi.json checked against the live answers.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from abstream.config import Settings
from abstream.devstack.broker import start_broker, stop_process
from abstream.devstack.ports import free_port
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy
from schemas.events import NAME_PATTERN, EventRecord, RecordEvent, RejectedRecord
from tests.stack import Infra, isolated_settings
from tests.test_gateway_assignment import JSON, Gateways, Rec, create_test, error_fields, poll, read_topic, unique

UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RECORD_EVENT_KEYS = set(RecordEvent.model_fields)
MiB = 1_048_576


@pytest.fixture(scope="module")
def gw(infra: Infra) -> Iterator[Gateways]:
    gws = Gateways(isolated_settings(infra))
    try:
        gws.start("G")
        yield gws
    finally:
        gws.close()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ts_ms(value: str | int) -> int:
    """Epoch ms of a client timestamp, computed independently of the gateway."""
    if isinstance(value, int):
        return value
    moment = datetime.fromisoformat(value)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def nest(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep (the object itself is level 1)."""
    obj: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        obj = {"a": obj}
    return obj


def sized(n: int) -> dict[str, str]:
    """An object whose compact JSON is exactly ``n`` bytes."""
    obj = {"p": "x" * (n - 8)}
    assert len(orjson.dumps(obj)) == n
    return obj


RICH_PROPERTIES = {
    "z_first": "key order is kept",
    "text": 'ユーザー🙂 "quoted" \\ back\nslash \u00e9',
    "int": 2**63 - 1,
    "neg": -5,
    "float": 0.1,
    "tiny": 1e-7,
    "huge": 1.5e300,
    "bool": True,
    "null": None,
    "list": [1, "a", None, {"x": []}, [2.5]],
    "nested": {"b": {"a": {"c": 1}}},
    "empty_obj": {},
    "empty_list": [],
}
RICH_CONTEXT = {"screen": {"w": 1170, "h": 2532}, "locale": "fr-FR", "tz": "+01:00"}


def mine(records: list[Rec], user: str) -> list[Rec]:
    return [r for r in records if r.key == user]


def events_of(settings: Settings, user: str, want_event_ids: set[str], timeout_s: float = 15) -> list[Rec]:
    """The `events` records of ``user`` once every id of ``want_event_ids`` is among them (and the log drained)."""

    def done(recs: list[Rec]) -> bool:
        ids = {e["event_id"] for r in mine(recs, user) for e in r.value["events"]}
        return want_event_ids <= ids

    return mine(read_topic(settings, "events", done, timeout_s), user)


def rejected_of(settings: Settings, user: str | None, n: int, pred: Any = None) -> list[Rec]:
    def sel(recs: list[Rec]) -> list[Rec]:
        return [r for r in recs if r.key == user and (pred is None or pred(r.value))]

    return sel(read_topic(settings, "events.rejected", lambda recs: len(sel(recs)) >= n))


def check_error(resp: httpx.Response, status: int, code: str, fields: dict[str, str] | None = None) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    got = error_fields(resp)
    if fields is not None:
        assert got == fields


def post(client: httpx.Client, path: str, body: Any, **headers: str) -> httpx.Response:
    return client.post(path, content=orjson.dumps(body), headers={**JSON, **headers})


# ============================================================================== /v1/events, read back


def test_v1_mixed_batch_answers_per_event_and_reads_back_exactly(gw: Gateways) -> None:
    user = unique("mixed")
    now = datetime.now(UTC)
    sent_at = iso(now - timedelta(seconds=10))  # the device clock is 10 s behind
    client_id = f"evt-{uuid.uuid4()}"
    events: list[Any] = [
        {"event_name": "app_open", "occurred_at": iso(now - timedelta(seconds=60)), "event_id": client_id,
         "properties": RICH_PROPERTIES, "context": RICH_CONTEXT},                                        # 0 ok
        {"event_name": "bad name", "occurred_at": iso(now)},                                              # 1
        {"event_name": "workout_started"},                                                                # 2
        {"event_name": "workout_started", "occurred_at": (now - timedelta(seconds=5)).astimezone(
            timezone(timedelta(hours=2))).isoformat(), "context": None},                                  # 3 ok
        {"event_name": "x", "occurred_at": iso(now), "properties": [1]},                                  # 4
        5,                                                                                                # 5
        {"event_name": "x", "occurred_at": "2026-01-01T00:00:00"},                                        # 6
        {"event_name": "session_submitted", "occurred_at": now_ms() - 1000, "properties": {}},            # 7 ok
        {"event_name": "x", "occurred_at": iso(now + timedelta(seconds=302))},                            # 8
        {"event_name": "future_ok", "occurred_at": iso(now + timedelta(seconds=289))},                    # 9 ok
        {"event_name": "x", "occurred_at": iso(now - timedelta(days=30, seconds=60))},                    # 10
        {"event_name": "old_ok", "occurred_at": iso(now - timedelta(days=30) + timedelta(seconds=60))},   # 11 ok
        {"event_name": "n" * 128, "occurred_at": iso(now)},                                               # 12 ok
        {"event_name": "n" * 129, "occurred_at": iso(now)},                                               # 13
        {"event_name": "x", "occurred_at": iso(now), "event_id": ""},                                     # 14
        {"event_name": "x", "occurred_at": iso(now), "event_id": "i" * 129},                              # 15
        {"event_name": "x", "occurred_at": iso(now), "properties": nest(9)},                              # 16
        {"event_name": "deep_ok", "occurred_at": iso(now), "properties": nest(8)},                        # 17 ok
        {"event_name": "x", "occurred_at": iso(now), "properties": sized(16_385)},                        # 18
        {"event_name": "big_ok", "occurred_at": iso(now), "properties": sized(16_384)},                   # 19 ok
        {"event_name": "x", "occurred_at": iso(now), "context": "str"},                                   # 20
        {"event_name": "x", "occurred_at": "yesterday"},                                                  # 21
        {"event_name": "x", "occurred_at": 1.5},                                                          # 22
        {"event_name": "$pageview", "occurred_at": iso(now), "event_id": "i" * 128, "unknown": "ignored"},  # 23 ok
        {"event_name": "x", "occurred_at": iso(now), "context": nest(9)},                                 # 24
        # 295 s ahead of the server, but 305 s after sent_at (on the same device clock): impossible
        {"event_name": "x", "occurred_at": iso(now + timedelta(seconds=295))},                            # 25
    ]  # fmt: skip
    rejected = {
        1: ("invalid_event_name", "events.1.event_name"),
        2: ("missing_occurred_at", "events.2.occurred_at"),
        4: ("invalid_properties", "events.4.properties"),
        5: ("invalid_event", "events.5"),
        6: ("naive_occurred_at", "events.6.occurred_at"),
        8: ("occurred_at_in_future", "events.8.occurred_at"),
        10: ("occurred_at_too_old", "events.10.occurred_at"),
        13: ("invalid_event_name", "events.13.event_name"),
        14: ("invalid_event_id", "events.14.event_id"),
        15: ("invalid_event_id", "events.15.event_id"),
        16: ("properties_too_deep", "events.16.properties"),
        18: ("properties_too_large", "events.18.properties"),
        20: ("invalid_context", "events.20.context"),
        21: ("invalid_occurred_at", "events.21.occurred_at"),
        22: ("invalid_occurred_at", "events.22.occurred_at"),
        24: ("context_too_deep", "events.24.context"),
        25: ("occurred_at_after_sent_at", "events.25.occurred_at"),
    }
    envelope = {
        "anonymous_user_id": user,
        "session_id": "s_123",
        "platform": "ios",
        "app_version": "0.10.0",
        "install_id": "i_123",
        "sent_at": sent_at,
    }
    with gw.client("G") as c:
        before = now_ms()
        resp = post(c, "/v1/events", {**envelope, "events": events})
        after = now_ms()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"accepted", "rejected", "duplicates", "results"}
    ok = [i for i in range(len(events)) if i not in rejected]
    assert (body["accepted"], body["rejected"], body["duplicates"]) == (len(ok), len(rejected), 0)
    assert [r["index"] for r in body["results"]] == list(range(len(events)))
    for i, result in enumerate(body["results"]):
        if i in rejected:
            assert set(result) == {"index", "status", "code", "field", "message"}, result
            assert (result["status"], result["code"], result["field"]) == ("rejected", *rejected[i]), result
            assert result["message"]
        else:
            assert set(result) == {"index", "status", "event_id", "duplicate"}, result
            assert result["status"] == "accepted" and result["duplicate"] is False
            if "event_id" in events[i]:
                assert result["event_id"] == events[i]["event_id"]
            else:
                assert UUID7_RE.match(result["event_id"]), result
    ids = [body["results"][i]["event_id"] for i in ok]
    assert len(set(ids)) == len(ids)

    # the accepted events: ONE record (one user, one request), keyed by the user, exactly as posted + stamps
    (record,) = events_of(gw.settings, user, set(ids))
    value = record.value
    EventRecord.model_validate(value)
    assert set(value) == {"v", "user_id", "surface", "received_at_ms", "events"}
    assert (value["v"], value["user_id"], value["surface"]) == (1, user, "v1")
    received = value["received_at_ms"]
    assert before <= received <= after
    skew = received - ts_ms(sent_at)
    assert before - ts_ms(sent_at) <= skew <= after - ts_ms(sent_at) and skew >= 10_000
    assert [e["event_id"] for e in value["events"]] == ids, "request order kept"
    for i, event in zip(ok, value["events"], strict=True):
        posted = events[i]
        assert set(event) == RECORD_EVENT_KEYS
        expected = {
            "event_id": body["results"][i]["event_id"],
            "event_id_source": "client" if "event_id" in posted else "server",
            "kind": "event",
            "event_name": posted["event_name"],
            "occurred_at": posted["occurred_at"],  # exactly as posted (string or integer)
            "occurred_at_ms": ts_ms(posted["occurred_at"]),
            "sent_at": sent_at,
            "skew_ms": skew,
            "corrected_at_ms": ts_ms(posted["occurred_at"]) + skew,
            "session_id": "s_123",
            "platform": "ios",
            "app_version": "0.10.0",
            "install_id": "i_123",
            "experiment_id": None,
            "metric_name": None,
            "value": None,
            "properties": posted.get("properties") or {},
            "context": posted.get("context") or {},
        }
        assert event == expected, i
        # byte for byte: same JSON, key order included
        assert orjson.dumps(event["properties"]) == orjson.dumps(expected["properties"])
        assert orjson.dumps(event["context"]) == orjson.dumps(expected["context"])
        if event["event_id_source"] == "server":  # UUIDv7: its timestamp is the receive time
            assert int(event["event_id"].replace("-", "")[:12], 16) == received
    assert type(value["events"][ok.index(7)]["occurred_at"]) is int

    # the rejected events: one dead letter each, with the reason and the raw event
    dead = rejected_of(gw.settings, user, len(rejected))
    assert len(dead) == len(rejected)
    assert len({r.partition for r in dead} | {record.partition}) == 1, "keyed by user like the events"
    for r in sorted(dead, key=lambda r: r.value["index"]):
        v = r.value
        RejectedRecord.model_validate(v)
        i = v["index"]
        result = body["results"][i]
        assert (v["code"], v["field"], v["message"]) == (result["code"], result["field"], result["message"])
        assert (v["v"], v["surface"], v["user_id"], v["received_at_ms"]) == (1, "v1", user, received)
        full = orjson.dumps(events[i]).decode()
        if len(full.encode()) <= 2048:
            assert v["raw_truncated"] is False and orjson.loads(v["raw"]) == events[i]
        else:
            assert v["raw_truncated"] is True and full.startswith(v["raw"]) and len(v["raw"].encode()) <= 2048


def test_integers_beyond_64_bits_are_refused_not_rounded(gw: Gateways) -> None:
    """orjson would read 2^64 as the float 1.8446744073709552e19: such an event is rejected by itself, and the
    boundary values that do fit (UInt64 max, Int64 min) reach Kafka as the same integers."""
    user = unique("bigint")
    at = now_ms() - 1000
    big = b"123456789012345678901234567890"

    def event(name: bytes, properties: bytes) -> bytes:
        return b'{"event_name":"%s","occurred_at":%d,"properties":%s}' % (name, at, properties)

    body = b'{"anonymous_user_id":"%s","events":[%s]}' % (
        user.encode(),
        b",".join(
            [
                event(b"fits", b'{"max":18446744073709551615,"min":-9223372036854775808,"id":"%s"}' % big),
                event(b"over", b'{"n":18446744073709551616}'),
                event(b"nested", b'{"a":[{"b":%s}]}' % big),
                event(b"inf", b'{"x":1e999}'),
                # deeper than orjson writes (254): once refused the whole request as "NaN and Infinity"
                event(b"deep", b'{"a":%s1e999%s}' % (b"[" * 300, b"]" * 300)),
            ]
        ),
    )
    with gw.client("G") as c:
        resp = c.post("/v1/events", content=body, headers=JSON)
        gz = c.post("/v1/events", content=gzip.compress(body), headers={**JSON, "Content-Encoding": "gzip"})
        track = c.post(
            "/apiv1/ab-tests/3/track",
            content=b'{"user_id":"%s","metric_name":"m","value":%s}' % (user.encode(), big),
            headers=JSON,
        )
        assignment = c.post(
            "/v1/assignment",
            content=b'{"anonymous_user_id":"%s","attributes":{"n":%s}}' % (user.encode(), big),
            headers=JSON,
        )
    for r in (resp, gz):
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["status"] == "accepted"
        assert [(x["code"], x["field"]) for x in results[1:]] == [
            ("integer_out_of_range", "events.1.properties.n"),
            ("integer_out_of_range", "events.2.properties.a.0.b"),
            ("non_finite_value", "events.3.properties.x"),
            ("properties_too_deep", "events.4.properties"),
        ]
    check_error(track, 400, "integer_out_of_range", {"value": "integer_out_of_range"})
    check_error(assignment, 400, "integer_out_of_range", {"attributes.n": "integer_out_of_range"})

    ids = {resp.json()["results"][0]["event_id"], gz.json()["results"][0]["event_id"]}
    records = events_of(gw.settings, user, ids)
    for record in records:
        (stored,) = record.value["events"]
        assert stored["properties"] == {"max": 2**64 - 1, "min": -(2**63), "id": big.decode()}
        assert type(stored["properties"]["max"]) is int
    dead = rejected_of(gw.settings, user, 5, lambda v: v["code"] == "integer_out_of_range")
    assert len(dead) == 5  # 2 events x 2 requests, and the metric
    (inf,) = rejected_of(gw.settings, user, 2, lambda v: v["code"] == "non_finite_value")[:1]
    assert inf.value["raw"].endswith('"properties":{"x":1e999}}'), "as sent"

    # a lone surrogate orjson refuses, after a number it stops at: 400, not a 500 from the re-read
    with gw.client("G") as c:
        surrogate = c.post(
            "/v1/events",
            content=b'{"events":[{"event_name":"e","occurred_at":%d,"properties":{"n":%s}}],'
            b'"anonymous_user_id":"\\ud800"}' % (at, b"9" * 400),
            headers=JSON,
        )
        refused = c.post(  # a refused gzip body is dead-lettered as the JSON it holds, not as gzip bytes
            "/v1/events",
            content=gzip.compress(b'{"anonymous_user_id":"%s","events":[ broken' % user.encode()),
            headers={**JSON, "Content-Encoding": "gzip"},
        )
    check_error(surrogate, 400, "non_finite_value")
    check_error(refused, 400, "malformed_json")
    (letter,) = rejected_of(gw.settings, None, 1, lambda v: v["code"] == "malformed_json" and user in v["raw"])
    assert letter.value["raw"] == '{"anonymous_user_id":"' + user + '","events":[ broken'
    assert sum(big.decode() in r.value["raw"] for r in dead) == 3, "the digits as sent, not a rounded float"


def test_v1_gzip_and_content_encoding(gw: Gateways) -> None:
    user = unique("gzip")
    eid = f"gz-{uuid.uuid4()}"
    payload = {
        "anonymous_user_id": user,
        "events": [
            {
                "event_name": "app_open",
                "occurred_at": iso(datetime.now(UTC)),
                "event_id": eid,
                "properties": {"compressed": True, "pad": "y" * 5000},
            }
        ],
    }
    raw = orjson.dumps(payload)
    with gw.client("G") as c:
        resp = c.post("/v1/events", content=gzip.compress(raw), headers={**JSON, "content-encoding": "gzip"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["accepted"] == 1
        (record,) = events_of(gw.settings, user, {eid})
        assert record.value["events"][0]["properties"] == payload["events"][0]["properties"]  # type: ignore[index]
        ark = orjson.dumps([{"event_type": "zipped", "user_id": user, "event_id": f"ark-{eid}"}])
        resp = c.post("/apiv1/events/batch", content=gzip.compress(ark), headers={**JSON, "content-encoding": "gzip"})
        assert resp.status_code == 200 and resp.json()["accepted"] == 1, resp.text
        assert events_of(gw.settings, user, {f"ark-{eid}"})
        # not gzip although it says so; a gzip bomb; an encoding we do not speak
        check_error(
            c.post("/v1/events", content=raw, headers={**JSON, "content-encoding": "gzip"}), 400, "invalid_gzip"
        )
        truncated = gzip.compress(raw)[:-12]
        check_error(
            c.post("/v1/events", content=truncated, headers={**JSON, "content-encoding": "gzip"}), 400, "invalid_gzip"
        )
        bomb = gzip.compress(b" " * (4 * MiB))
        check_error(
            c.post("/v1/events", content=bomb, headers={**JSON, "content-encoding": "gzip"}),
            413,
            "compression_ratio_exceeded",
        )
        check_error(
            c.post("/v1/events", content=raw, headers={**JSON, "content-encoding": "br"}),
            415,
            "unsupported_content_encoding",
        )


def _exact_body(size: int, user: str, eid: str) -> bytes:
    body = orjson.dumps(
        {
            "anonymous_user_id": user,
            "events": [{"event_name": "padded", "occurred_at": iso(datetime.now(UTC)), "event_id": eid}],
        }
    )
    return body + b" " * (size - len(body))  # JSON allows trailing whitespace


def test_v1_request_limits_and_envelope_errors(gw: Gateways) -> None:
    user = unique("limits")
    now = iso(datetime.now(UTC))
    with gw.client("G") as c:
        # body size: exactly max_body_bytes is fine, one byte more is 413 (with and without Content-Length)
        resp = c.post("/v1/events", content=_exact_body(MiB, user, "exact"), headers=JSON)
        assert resp.status_code == 200, resp.text
        check_error(
            c.post("/v1/events", content=_exact_body(MiB + 1, user, "over"), headers=JSON), 413, "payload_too_large"
        )
        chunked = iter([_exact_body(MiB + 1, user, "chunked")])
        check_error(c.post("/v1/events", content=chunked, headers=JSON), 413, "payload_too_large")
        # events per request: 1000 fine, 1001 is 413
        batch = [{"event_name": "tick", "occurred_at": now, "properties": {"i": i}} for i in range(1001)]
        resp = post(c, "/v1/events", {"anonymous_user_id": user, "events": batch[:1000]})
        assert resp.status_code == 200 and resp.json()["accepted"] == 1000, resp.text[:300]
        check_error(
            post(c, "/v1/events", {"anonymous_user_id": user, "events": batch}),
            413,
            "too_many_events",
            {"events": "too_many_events"},
        )
        # malformed JSON names the problem; non-finite numbers; content types
        resp = c.post("/v1/events", content=b'{"anonymous_user_id": "u", "events": [', headers=JSON)
        check_error(resp, 400, "malformed_json")
        assert "JSON" in resp.json()["error"]["message"]
        check_error(
            c.post("/v1/events", content=b'{"anonymous_user_id": "u", "x": NaN}', headers=JSON), 400, "non_finite_value"
        )
        for ctype in ("text/xml", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            check_error(
                c.post("/v1/events", content=b"{}", headers={"content-type": ctype}), 415, "unsupported_media_type"
            )
        beacon = post(
            c,
            "/v1/events",
            {"anonymous_user_id": user, "events": [{"event_name": "a", "occurred_at": now}]},
            **{"content-type": "text/plain;charset=UTF-8"},
        )  # navigator.sendBeacon
        assert beacon.status_code == 200, beacon.text
        # envelope errors reject the request, naming the field
        good = [{"event_name": "a", "occurred_at": now}]
        for body, code, field in (
            ({"events": good}, "missing_anonymous_user_id", "anonymous_user_id"),
            ({"anonymous_user_id": "", "events": good}, "invalid_anonymous_user_id", "anonymous_user_id"),
            ({"anonymous_user_id": "u" * 129, "events": good}, "invalid_anonymous_user_id", "anonymous_user_id"),
            ({"anonymous_user_id": 7, "events": good}, "invalid_anonymous_user_id", "anonymous_user_id"),
            ({"anonymous_user_id": "u", "platform": "web", "events": good}, "invalid_platform", "platform"),
            ({"anonymous_user_id": "u", "app_version": 3, "events": good}, "invalid_app_version", "app_version"),
            ({"anonymous_user_id": "u", "session_id": "", "events": good}, "invalid_session_id", "session_id"),
            ({"anonymous_user_id": "u", "install_id": [], "events": good}, "invalid_install_id", "install_id"),
            ({"anonymous_user_id": "u", "sent_at": "2026-01-01T00:00:00", "events": good}, "naive_sent_at", "sent_at"),
            ({"anonymous_user_id": "u", "sent_at": "soon", "events": good}, "invalid_sent_at", "sent_at"),
            (
                {"anonymous_user_id": "u", "sent_at": "9999-12-31T23:59:59Z", "events": good},
                "sent_at_in_future",
                "sent_at",
            ),
            ({"anonymous_user_id": "u", "sent_at": 0, "events": good}, "sent_at_too_old", "sent_at"),
            ({"anonymous_user_id": "u", "events": []}, "invalid_events", "events"),
            ({"anonymous_user_id": "u"}, "invalid_events", "events"),
            ({"anonymous_user_id": "u", "events": {"0": good[0]}}, "invalid_events", "events"),
            ([good[0]], "invalid_body", "body"),
        ):
            check_error(post(c, "/v1/events", body), 400, code, {field: code})
        assert post(c, "/v1/events", {"anonymous_user_id": "u" * 128, "events": good}).status_code == 200

    # A request refused as a whole leaves one dead letter too (scope "request"), with the body as sent.
    refused, marker = unique("refused"), unique("marker")
    envelope = {"anonymous_user_id": refused, "platform": "web", "events": good, "m": marker}
    many = {"anonymous_user_id": refused, "events": batch}
    malformed = b'{"m": "' + marker.encode() + b'", "events": ['
    with gw.client("G") as c:
        check_error(post(c, "/v1/events", envelope), 400, "invalid_platform")
        check_error(post(c, "/v1/events", many), 413, "too_many_events")
        check_error(c.post("/v1/events", content=malformed, headers=JSON), 400, "malformed_json")
        check_error(
            c.post("/v1/events", content=marker.encode(), headers={"content-type": "text/xml"}),
            415,
            "unsupported_media_type",
        )
    by_code = {r.value["code"]: r for r in rejected_of(gw.settings, refused, 2)}
    by_code |= {r.value["code"]: r for r in rejected_of(gw.settings, None, 2, lambda v: marker in v["raw"])}
    assert set(by_code) == {"invalid_platform", "too_many_events", "malformed_json", "unsupported_media_type"}
    for r in by_code.values():
        dead = RejectedRecord.model_validate(r.value)
        assert (dead.scope, dead.index, dead.surface) == ("request", 0, "v1")
    v = by_code["invalid_platform"].value
    assert (v["field"], v["user_id"], v["raw_truncated"]) == ("platform", refused, False)
    assert orjson.loads(v["raw"]) == envelope
    v = by_code["too_many_events"].value
    assert (v["field"], v["user_id"], v["raw_truncated"]) == ("events", refused, True)
    assert orjson.dumps(many).decode().startswith(v["raw"]) and len(v["raw"].encode()) <= 2048
    v = by_code["malformed_json"].value
    assert (v["field"], v["user_id"], v["raw"], v["raw_truncated"]) == ("body", None, malformed.decode(), False)
    assert by_code["unsupported_media_type"].value["raw"] == marker


def test_duplicate_event_ids_are_flagged_and_not_republished(gw: Gateways) -> None:
    user, other = unique("dup"), unique("dup-other")
    x, y, sentinel = (f"{n}-{uuid.uuid4()}" for n in ("x", "y", "sentinel"))
    now = iso(datetime.now(UTC))

    def ev(eid: str, name: str = "purchase") -> dict[str, Any]:
        return {"event_name": name, "occurred_at": now, "event_id": eid, "properties": {"amount": 9.99}}

    with gw.client("G") as c:
        first = post(c, "/v1/events", {"anonymous_user_id": user, "events": [ev(x), ev(x)]}).json()
        assert [r["duplicate"] for r in first["results"]] == [False, True]  # a repeat inside one request
        assert (first["accepted"], first["duplicates"]) == (2, 1)
        again = post(c, "/v1/events", {"anonymous_user_id": user, "events": [ev(x, "retry"), ev(y)]}).json()
        assert again["results"] == [
            {"index": 0, "status": "accepted", "event_id": x, "duplicate": True},
            {"index": 1, "status": "accepted", "event_id": y, "duplicate": False},
        ]
        assert (again["accepted"], again["rejected"], again["duplicates"]) == (2, 0, 1)
        # the same id from another user is not a duplicate (ids are per user)
        assert post(c, "/v1/events", {"anonymous_user_id": other, "events": [ev(x)]}).json()["duplicates"] == 0
        # ArkForge surface shares the cache: a retried apiv1 event is flagged too
        ark = {"event_type": "click", "user_id": user, "event_id": f"ark-{x}"}
        assert post(c, "/apiv1/events", ark).json()["results"][0]["duplicate"] is False
        assert post(c, "/apiv1/events", ark).json()["results"][0]["duplicate"] is True
        assert post(c, "/v1/events", {"anonymous_user_id": user, "events": [ev(sentinel)]}).status_code == 200
    records = events_of(gw.settings, user, {sentinel})
    published = [e["event_id"] for r in records for e in r.value["events"]]
    assert published == [x, y, f"ark-{x}", sentinel], "each id published once, in order, on the user's partition"
    assert [e["event_name"] for r in records for e in r.value["events"]][0] == "purchase", "the first one wins"
    assert len({r.partition for r in records}) == 1


# ================================================================================ ArkForge surface


def test_apiv1_single_event(gw: Gateways) -> None:
    user = unique("user123")
    seed_example = {
        "event_type": "button_click",
        "user_id": user,
        "session_id": "session456",
        "properties": {"button_name": "submit", "page": "homepage"},
    }
    occurred = iso(datetime.now(UTC) - timedelta(seconds=3))
    with gw.client("G") as c:
        before = now_ms()
        one = post(c, "/apiv1/events", seed_example)
        after = now_ms()
        assert one.status_code == 200, one.text
        body = one.json()
        assert (body["accepted"], body["rejected"], body["duplicates"]) == (1, 0, 0)
        (result,) = body["results"]
        assert result["index"] == 0 and result["status"] == "accepted" and UUID7_RE.match(result["event_id"])
        timed = post(
            c,
            "/apiv1/events",
            {"event_type": "page_view", "user_id": user, "occurred_at": occurred, "event_id": f"t-{user}"},
        ).json()
        aliased = post(
            c,
            "/apiv1/events",
            {"event_type": "page_view", "user_id": user, "timestamp": 1_700_000_000_000, "event_id": f"a-{user}"},
        )
        # epoch ms from 2023 is older than the 30-day horizon: rejected, 400 naming the alias
        check_error(aliased, 400, "occurred_at_too_old", {"timestamp": "occurred_at_too_old"})
        recent = now_ms() - 5000
        aliased = post(
            c,
            "/apiv1/events",
            {"event_type": "page_view", "user_id": user, "timestamp": recent, "event_id": f"a-{user}"},
        ).json()
        # one bad event is a 400 naming the field, with a machine-readable code
        check_error(
            post(c, "/apiv1/events", {"event_type": "bad type", "user_id": user}),
            400,
            "invalid_event_type",
            {"event_type": "invalid_event_type"},
        )
        check_error(
            post(c, "/apiv1/events", {"event_type": "ok"}), 400, "missing_user_id", {"user_id": "missing_user_id"}
        )
        check_error(
            post(c, "/apiv1/events", {"event_type": "ok", "user_id": ""}),
            400,
            "invalid_user_id",
            {"user_id": "invalid_user_id"},
        )
        check_error(
            post(c, "/apiv1/events", {"event_type": "ok", "user_id": user, "properties": "x"}),
            400,
            "invalid_properties",
            {"properties": "invalid_properties"},
        )
        check_error(post(c, "/apiv1/events", [seed_example]), 400, "invalid_body", {"body": "invalid_body"})
        check_error(c.post("/apiv1/events", content=b"{", headers=JSON), 400, "malformed_json")
        check_error(
            c.post("/apiv1/events", content=b"{}", headers={"content-type": "text/html"}), 415, "unsupported_media_type"
        )
    ids = {result["event_id"], f"t-{user}", f"a-{user}"}
    records = events_of(gw.settings, user, ids)
    assert len(records) == 3, "one record per request"
    first = records[0].value
    assert (first["surface"], first["user_id"]) == ("apiv1", user) and before <= first["received_at_ms"] <= after
    assert first["events"] == [
        {
            "event_id": result["event_id"],
            "event_id_source": "server",
            "kind": "event",
            "event_name": "button_click",
            "occurred_at": None,
            "occurred_at_ms": first["received_at_ms"],
            "sent_at": None,
            "skew_ms": None,
            "corrected_at_ms": None,
            "session_id": "session456",
            "platform": None,
            "app_version": None,
            "install_id": None,
            "experiment_id": None,
            "metric_name": None,
            "value": None,
            "properties": {"button_name": "submit", "page": "homepage"},
            "context": {},
        }
    ]
    (ev_timed,) = records[1].value["events"]
    assert (ev_timed["occurred_at"], ev_timed["occurred_at_ms"]) == (occurred, ts_ms(occurred))
    assert ev_timed["event_id_source"] == "client" and timed["results"][0]["event_id"] == f"t-{user}"
    (ev_alias,) = records[2].value["events"]
    assert (ev_alias["occurred_at"], ev_alias["occurred_at_ms"]) == (recent, recent)
    assert aliased["accepted"] == 1
    # every 400 above that concerned one event left its dead letter (the refused requests: theirs had no user)
    dead = rejected_of(gw.settings, user, 3)
    assert sorted(r.value["code"] for r in dead) == ["invalid_event_type", "invalid_properties", "occurred_at_too_old"]
    assert all(r.value["surface"] == "apiv1" and r.value["index"] == 0 for r in dead)
    nameless = rejected_of(gw.settings, None, 1, lambda v: v["code"] == "missing_user_id" and v["surface"] == "apiv1")
    assert orjson.loads(nameless[0].value["raw"]) == {"event_type": "ok"}


def test_apiv1_batch_per_event_answer_one_record_per_user(gw: Gateways) -> None:
    u1, u2 = unique("batch-a"), unique("batch-b")
    batch: list[Any] = [
        {"event_type": "e0", "user_id": u1, "properties": {"n": 0}},
        {"event_type": "e1", "user_id": u2, "session_id": "s2"},
        {"event_type": "e2", "user_id": u1, "properties": {"n": 2}},
        {"user_id": u1},
        {"event_type": "e4", "user_id": u2, "properties": [4]},
        "not an event",
        {"event_type": "e6", "user_id": u2, "occurred_at": iso(datetime.now(UTC) + timedelta(seconds=302))},
    ]
    with gw.client("G") as c:
        resp = post(c, "/apiv1/events/batch", batch)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        check_error(post(c, "/apiv1/events/batch", batch[0]), 400, "invalid_body", {"body": "invalid_body"})
        check_error(post(c, "/apiv1/events/batch", []), 400, "invalid_events", {"body": "invalid_events"})
        check_error(post(c, "/apiv1/events/batch", [batch[0]] * 1001), 413, "too_many_events")
    assert (body["accepted"], body["rejected"], body["duplicates"]) == (3, 4, 0)
    statuses = [(r["status"], r.get("code"), r.get("field")) for r in body["results"]]
    assert statuses == [
        ("accepted", None, None),
        ("accepted", None, None),
        ("accepted", None, None),
        ("rejected", "missing_event_type", "3.event_type"),
        ("rejected", "invalid_properties", "4.properties"),
        ("rejected", "invalid_event", "5"),
        ("rejected", "occurred_at_in_future", "6.occurred_at"),
    ]
    ids = [r.get("event_id") for r in body["results"]]
    (r1,) = events_of(gw.settings, u1, {ids[0], ids[2]})
    (r2,) = events_of(gw.settings, u2, {ids[1]})
    assert [e["event_name"] for e in r1.value["events"]] == ["e0", "e2"]
    assert [e["properties"] for e in r1.value["events"]] == [{"n": 0}, {"n": 2}]
    assert [(e["event_name"], e["session_id"]) for e in r2.value["events"]] == [("e1", "s2")]
    assert r1.value["received_at_ms"] == r2.value["received_at_ms"]
    dead = rejected_of(gw.settings, u2, 2, lambda v: v["received_at_ms"] == r1.value["received_at_ms"])
    assert sorted(r.value["index"] for r in dead) == [4, 6]


def test_track_metric(gw: Gateways) -> None:
    user = unique("track")
    with gw.client("G") as c:
        ok_float = post(
            c,
            "/apiv1/ab-tests/3/track",
            {"user_id": user, "metric_name": "session_length", "value": 2.5, "properties": {"src": "t"}},
        )
        ok_int = post(c, "/apiv1/ab-tests/4/track", {"user_id": user, "metric_name": "badges", "value": 7})
        assert ok_float.status_code == 200 and ok_int.status_code == 200, (ok_float.text, ok_int.text)
        bound = {"user_id": unique("track-big"), "metric_name": "big", "value": -(2**53)}
        big = post(c, "/apiv1/ab-tests/3/track", bound)
        assert big.status_code == 200, big.text  # the bound itself is accepted
        assert ok_float.json()["accepted"] == 1
        for test_id in ("999999", "abc"):
            check_error(
                post(c, f"/apiv1/ab-tests/{test_id}/track", {"user_id": user, "metric_name": "m", "value": 1}),
                404,
                "test_not_found",
            )
        for raw, code in (
            (b"1e999", "non_finite_value"),
            (b"NaN", "non_finite_value"),
            (b"-Infinity", "non_finite_value"),
        ):
            content = b'{"user_id": "%s", "metric_name": "m", "value": %s}' % (user.encode(), raw)
            check_error(c.post("/apiv1/ab-tests/3/track", content=content, headers=JSON), 400, code)
        for body, code, field in (
            ({"user_id": user, "metric_name": "m", "value": True}, "invalid_value", "value"),
            ({"user_id": user, "metric_name": "m", "value": "3"}, "invalid_value", "value"),
            ({"user_id": user, "metric_name": "m", "value": 9007199254740994.0}, "value_out_of_range", "value"),
            ({"user_id": user, "metric_name": "m", "value": -1e160}, "value_out_of_range", "value"),
            ({"user_id": user, "metric_name": "m"}, "missing_value", "value"),
            ({"user_id": user, "value": 1}, "missing_metric_name", "metric_name"),
            ({"user_id": user, "metric_name": "bad name", "value": 1}, "invalid_metric_name", "metric_name"),
            ({"metric_name": "m", "value": 1}, "missing_user_id", "user_id"),
        ):
            check_error(post(c, "/apiv1/ab-tests/3/track", body), 400, code, {field: code})
    ids = {ok_float.json()["results"][0]["event_id"], ok_int.json()["results"][0]["event_id"]}
    records = events_of(gw.settings, user, ids)
    assert len(records) == 2
    got = {e["metric_name"]: (r.value["surface"], e) for r in records for e in r.value["events"]}
    surface, e = got["session_length"]
    assert surface == "track"
    assert (e["kind"], e["event_name"], e["experiment_id"], e["value"], e["properties"]) == (
        "metric",
        "session_length",
        "3",
        2.5,
        {"src": "t"},
    )
    surface, e = got["badges"]
    assert (e["experiment_id"], e["value"], type(e["value"])) == ("4", 7, int)


def test_events_and_assignments_are_co_partitioned(gw: Gateways) -> None:
    """A user's events and assignment records land on the same partition number (enrichment relies on it)."""
    users = [unique("copart") for _ in range(12)]
    with gw.client("G") as c:
        for u in users:
            assert c.post("/v1/assignment", json={"anonymous_user_id": u}).status_code == 200
            assert post(c, "/apiv1/events", {"event_type": "x", "user_id": u, "event_id": f"c-{u}"}).status_code == 200
    want = set(users)
    events = read_topic(gw.settings, "events", lambda recs: want <= {r.key for r in recs})
    assignments = read_topic(gw.settings, "assignments", lambda recs: want <= {r.key for r in recs})
    ev_part = {r.key: r.partition for r in events if r.key in want}
    as_part = {r.key: r.partition for r in assignments if r.key in want}
    assert ev_part == as_part
    assert len(set(ev_part.values())) > 1, "users spread over partitions"


# ========================================================================================= OpenAPI

SURFACES = {
    ("post", "/v1/assignment"),
    ("post", "/v1/events"),
    ("post", "/apiv1/events"),
    ("post", "/apiv1/events/batch"),
    ("post", "/apiv1/ab-tests"),
    ("get", "/apiv1/ab-tests"),
    ("get", "/apiv1/ab-tests/{test_id}"),
    ("patch", "/apiv1/ab-tests/{test_id}"),
    ("post", "/apiv1/ab-tests/{test_id}/assign"),
    ("post", "/apiv1/ab-tests/{test_id}/track"),
    ("get", "/apiv1/ab-tests/{test_id}/results"),
}


def test_openapi_describes_both_surfaces_and_matches_live_answers(gw: Gateways) -> None:
    with gw.client("G") as c:
        doc = c.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        ops = {(m, p) for p, item in doc["paths"].items() for m in item}
        assert SURFACES <= ops, SURFACES - ops
        components = doc["components"]["schemas"]

        def schema(method: str, path: str, status: int) -> dict[str, Any]:
            op = doc["paths"][path][method]
            return {
                **op["responses"][str(status)]["content"]["application/json"]["schema"],
                "components": doc["components"],
            }

        def validate(instance: Any, method: str, path: str, status: int) -> None:
            jsonschema.Draft202012Validator(schema(method, path, status)).validate(instance)

        for method, path in SURFACES:
            op = doc["paths"][path][method]
            assert op["summary"] and op["responses"], (method, path)
            names = [p["name"] for p in op.get("parameters", [])]
            if method in ("post", "patch") and not path.endswith("/results"):
                content = op["requestBody"]["content"]
                assert content["application/json"]["schema"], (method, path)
                assert content["text/plain"] == content["application/json"], "sendBeacon bodies"
                assert names[-1] == "Content-Encoding", (method, path)
                encoding = op["parameters"][-1]
                assert encoding["in"] == "header" and "gzip" in encoding["schema"]["enum"]
            success = [s for s in op["responses"] if s.startswith("2")]
            if not path.endswith("/results"):
                assert success and all("content" in op["responses"][s] for s in success), (method, path)
            if "{test_id}" in path:
                assert names[0] == "test_id"
            if "503" in op["responses"]:
                assert "Retry-After" in op["responses"]["503"]["headers"], (method, path)
        # names carry their pattern and bounds, as the gateway enforces them
        for model, field in (("V1Event", "event_name"), ("ApiV1Event", "event_type")):
            name = components[model]["properties"][field]
            assert (name["pattern"], name["minLength"], name["maxLength"]) == (NAME_PATTERN, 1, 128)
        # request schemas name the seed fields
        req = lambda m, p: doc["paths"][p][m]["requestBody"]["content"]["application/json"]["schema"]  # noqa: E731
        resolve = lambda s: components[s["$ref"].rsplit("/", 1)[1]] if "$ref" in s else s  # noqa: E731
        assert {"anonymous_user_id", "events"} <= set(resolve(req("post", "/v1/events"))["properties"])
        assert {"anonymous_user_id", "platform", "app_version", "session_id", "install_id"} <= set(
            resolve(req("post", "/v1/assignment"))["properties"]
        )
        assert {"event_type", "user_id", "session_id", "properties"} <= set(
            resolve(req("post", "/apiv1/events"))["properties"]
        )
        assert {"test_name", "description", "variants"} <= set(resolve(req("post", "/apiv1/ab-tests"))["properties"])
        assert {"user_id", "metric_name", "value"} <= set(
            resolve(req("post", "/apiv1/ab-tests/{test_id}/track"))["properties"]
        )
        assert resolve(req("post", "/apiv1/events/batch"))["type"] == "array"
        validate(c.get("/health/live").json(), "get", "/health/live", 200)
        validate(c.get("/health/ready").json(), "get", "/health/ready", 200)

        # live answers validate against the documented schemas
        user = unique("openapi")
        now = iso(datetime.now(UTC))
        validate(c.post("/v1/assignment", json={"anonymous_user_id": user}).json(), "post", "/v1/assignment", 200)
        validate(
            post(
                c,
                "/v1/events",
                {"anonymous_user_id": user, "events": [{"event_name": "a", "occurred_at": now}, {"event_name": "b c"}]},
            ).json(),
            "post",
            "/v1/events",
            200,
        )
        err = c.post("/v1/assignment", json={"anonymous_user_id": ""})
        validate(err.json(), "post", "/v1/assignment", 400)
        validate(
            post(c, "/apiv1/events/batch", [{"event_type": "a", "user_id": user}]).json(),
            "post",
            "/apiv1/events/batch",
            200,
        )
        validate(c.get("/apiv1/ab-tests").json(), "get", "/apiv1/ab-tests", 200)
        validate(c.get("/apiv1/ab-tests/3").json(), "get", "/apiv1/ab-tests/{test_id}", 200)
        validate(c.get("/apiv1/ab-tests/12345").json(), "get", "/apiv1/ab-tests/{test_id}", 404)
        validate(
            c.post("/apiv1/ab-tests/3/assign", json={"user_id": user}).json(),
            "post",
            "/apiv1/ab-tests/{test_id}/assign",
            200,
        )
        created = c.post(
            "/apiv1/ab-tests",
            json={"test_name": unique("oa"), "variants": [{"variant_name": "a"}, {"variant_name": "b"}]},
        )
        assert created.status_code == 201
        validate(created.json(), "post", "/apiv1/ab-tests", 201)
        with pytest.raises(jsonschema.ValidationError):  # the validation is real: a wrong shape fails
            validate({"accepted": "1"}, "post", "/v1/events", 200)


# =================================================================================== broker outage


def _ready(c: httpx.Client) -> bool:
    try:
        return c.get("/health/ready").status_code == 200
    except httpx.TransportError:
        return False


async def _partitions(bootstrap: str, topics: list[str]) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        return {t: len(consumer.partitions_for_topic(t) or ()) for t in topics}
    finally:
        await consumer.stop()


def check_unavailable(resp: httpx.Response, code: str = "kafka_unavailable") -> None:
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["retry-after"]) > 0
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "accepted" not in resp.text.replace("nothing was accepted", "")


def test_broker_outage_503_then_resumes_without_restart(infra: Infra, tmp_path: Any) -> None:
    port = free_port()
    settings = isolated_settings(infra, kafka_bootstrap_servers=f"127.0.0.1:{port}", kafka_produce_timeout_s=2.0)
    gport = free_port()
    gateway = Child(
        "gateway",
        abstream_argv("gateway", "--port", str(gport)),
        f"http://127.0.0.1:{gport}",
        lambda: http_ok(f"http://127.0.0.1:{gport}/health/live"),
        log_path=tmp_path / "gateway.log",
    )
    broker = None
    user = unique("outage")

    def batch(tag: str, bad: bool = False) -> dict[str, Any]:
        events: list[Any] = [{"event_name": "tick", "occurred_at": iso(datetime.now(UTC)), "event_id": tag}]
        if bad:
            events.append({"event_name": "bad name", "occurred_at": iso(datetime.now(UTC))})
        return {"anonymous_user_id": user, "events": events}

    gateway.start(settings.as_env())
    try:
        wait_healthy(gateway, 30)
        with httpx.Client(base_url=gateway.address, timeout=30) as c:
            # Kafka down at start: live, not ready, and no 2xx for anything that must reach Kafka
            assert c.get("/health/live").status_code == 200
            ready = c.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["kafka"] is False
            check_unavailable(post(c, "/v1/events", batch("never-1")))
            check_unavailable(post(c, "/apiv1/events", {"event_type": "x", "user_id": user}))
            check_unavailable(c.post("/v1/assignment", json={"anonymous_user_id": user}), "registry_not_ready")

            broker = start_broker("127.0.0.1", port)
            poll(lambda: _ready(c), 20, 0.1)
            assert post(c, "/v1/events", batch("before-outage")).status_code == 200

            stop_process(broker)
            broker = None
            started = time.monotonic()
            check_unavailable(post(c, "/v1/events", batch("during-outage")))
            assert time.monotonic() - started < settings.kafka_produce_timeout_s + 3
            check_unavailable(post(c, "/apiv1/events/batch", [{"event_type": "x", "user_id": user}]))
            check_unavailable(post(c, "/apiv1/ab-tests/3/track", {"user_id": user, "metric_name": "m", "value": 1}))
            # nothing to accept: the answer does not wait for Kafka (a 503 would ask for a retry that cannot succeed)
            started = time.monotonic()
            bad_users = [unique("outage-bad"), unique("outage-bad")]
            resp = post(c, "/apiv1/events", {"event_type": "bad name", "user_id": bad_users[0]})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_event_type", resp.text
            resp = post(c, "/v1/events", {"anonymous_user_id": bad_users[1], "events": [{"event_name": "!"}]})
            assert resp.status_code == 200 and (resp.json()["accepted"], resp.json()["rejected"]) == (0, 1)
            assert time.monotonic() - started < settings.kafka_produce_timeout_s
            check_unavailable(c.post("/v1/assignment", json={"anonymous_user_id": user}))
            check_unavailable(c.post("/apiv1/ab-tests/3/assign", json={"user_id": user}))
            assert c.get("/health/live").status_code == 200
            # not ready while Kafka does not answer (a failed publish says so at once), with the reason
            ready = c.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["checks"] == {"kafka": False, "registry": True}
            assert ready.headers["retry-after"]

            # the broker returns EMPTY (tansu keeps nothing): ingestion resumes, same gateway process
            broker = start_broker("127.0.0.1", port)
            poll(lambda: _ready(c), 20, 0.1)  # the once-a-second broker check notices, before any publish

            def resumed() -> bool:
                resp = post(c, "/v1/events", batch("after-outage"))
                assert resp.status_code in (200, 503), resp.text
                return resp.status_code == 200

            poll(resumed, 30, 0.25)
            resp = post(c, "/v1/events", batch("after-outage-2", bad=True))
            assert resp.status_code == 200 and resp.json()["rejected"] == 1
            assign = c.post("/v1/assignment", json={"anonymous_user_id": user})
            assert assign.status_code == 200, assign.text

            # what the gateway acknowledged after the outage is really in the (re-created) topics
            names = [settings.topic(t) for t in ("events", "assignments", "events.rejected")]
            assert asyncio.run(_partitions(settings.kafka_bootstrap_servers, names)) == dict.fromkeys(
                names, settings.kafka_partitions
            )
            records = events_of(settings, user, {"after-outage", "after-outage-2"}, timeout_s=10)
            ids = [e["event_id"] for r in records for e in r.value["events"]]
            assert ids.count("after-outage-2") == 1 and "after-outage" in ids
            dead = rejected_of(settings, user, 1)
            assert dead[0].value["code"] == "invalid_event_name"
            # the dead letters of the outage's all-rejected requests were kept and sent once Kafka was back
            for bad_user, code in zip(bad_users, ("invalid_event_type", "invalid_event_name"), strict=True):
                assert [r.value["code"] for r in rejected_of(settings, bad_user, 1)] == [code]
            n = len(assign.json()["assignments"])
            recs = read_topic(settings, "assignments", lambda rs: len([r for r in rs if r.key == user]) >= n, 10)
            assert len([r for r in recs if r.key == user]) == n

            # the broker restarts empty while the gateway is idle (no publish fails): topics come back by themselves
            stop_process(broker)
            broker = start_broker("127.0.0.1", port)
            poll(
                lambda: (
                    asyncio.run(_partitions(settings.kafka_bootstrap_servers, names))
                    == dict.fromkeys(names, settings.kafka_partitions)
                ),
                10,
                0.2,
            )
            assert post(c, "/v1/events", batch("after-idle-restart")).status_code == 200
            assert events_of(settings, user, {"after-idle-restart"}, timeout_s=10)
    finally:
        gateway.stop()
        if broker is not None:
            stop_process(broker)


# ====================================================================== events and assignments, one clock


def test_an_assignment_is_after_every_event_acknowledged_before_it_and_never_after_one_sent_after(
    gw: Gateways,
) -> None:
    """Attribution compares whole milliseconds (an event counts when received at or after the assignment). A
    client that posts an event and asks for its variant within the same millisecond must not see that event
    counted, and an event it posts once it has the answer must be counted: the gateway stamps the assignment
    one millisecond on and answers only when its clock got there. Fast rounds on one keep-alive connection,
    through both surfaces, then the stamps read back from both topics."""
    users = [unique("clock") for _ in range(400)]
    with gw.client("G") as c:
        test = create_test(c, unique("clock_order"))

        def event(user: str, name: str) -> None:
            body = {"event_type": name, "user_id": user, "event_id": str(uuid.uuid4())}
            assert c.post("/apiv1/events", json=body).status_code in (200, 201, 202)

        for i, user in enumerate(users):
            event(user, "before")
            if i % 2:
                r = c.post("/v1/assignment", json={"anonymous_user_id": user})
            else:
                r = c.post(f"/apiv1/ab-tests/{test['id']}/assign", json={"user_id": user})
            assert r.status_code == 200, r.text
            event(user, "after")
    wanted = set(users)
    assigned = read_topic(gw.settings, "assignments", lambda rs: wanted <= {r.key for r in rs}, 30)
    received = read_topic(gw.settings, "events", lambda rs: sum(r.key in wanted for r in rs) >= 2 * len(users), 30)
    first_assigned: dict[str, int] = {}
    for r in assigned:
        if r.key in wanted:
            first_assigned[r.key] = min(first_assigned.get(r.key, r.value["assigned_at"]), r.value["assigned_at"])
    assert set(first_assigned) == wanted
    for r in received:
        if r.key not in wanted:
            continue
        for ev in r.value["events"]:
            at = first_assigned[r.key]
            if ev["event_name"] == "before":
                assert r.value["received_at_ms"] < at, (r.key, r.value["received_at_ms"], at)
            else:
                assert r.value["received_at_ms"] >= at, (r.key, r.value["received_at_ms"], at)
