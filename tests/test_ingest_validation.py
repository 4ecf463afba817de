"""Unit tests of the ingestion core (gateway/ingest.py, body.py, rules.py, records.py, dedup.py; schemas/events.py):
every rule at its boundaries.

Pure: no broker, no ClickHouse, no clock (received_at is a fixed instant). The fuzz tests feed random JSON
shapes and random bytes: the only outcomes allowed are an IngestResult or an ApiError.
"""

from __future__ import annotations

import gzip
import random
import tracemalloc
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

import gateway.records as ingest_mod
from abstream.config import Settings
from gateway.body import decode_body
from gateway.dedup import DedupCache
from gateway.ingest import IngestResult, ingest_apiv1_batch, ingest_apiv1_one, ingest_track, ingest_v1
from gateway.records import refused_request
from schemas.errors import ApiError
from schemas.events import (
    RECORD_EVENT_KEYS,
    REJECTED_RAW_MAX_BYTES,
    ApiV1Event,
    ApiV1EventBatch,
    EventRecord,
    IngestResponse,
    RecordEvent,
    RejectedRecord,
    TrackRequest,
    UnsupportedRecordVersion,
    V1Event,
    V1EventsRequest,
    decode_record,
    encode_record,
    timestamp_ms,
)

S = Settings()
NOW = 1_771_496_130_000  # 2026-02-19T10:15:30.000Z, the gateway's receive time in every test
NOW_DT = datetime(2026, 2, 19, 10, 15, 30, tzinfo=UTC)


def iso(ms: int) -> str:
    return (datetime.fromtimestamp(0, UTC) + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")


def ev(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event_name": "session_submitted", "occurred_at": iso(NOW - 1000)}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def v1(*events: dict[str, Any], **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"anonymous_user_id": "550e8400-e29b-41d4-a716-446655440000", "platform": "ios"}
    body.update(top)
    body["events"] = list(events) if events else [ev()]
    return {k: v for k, v in body.items() if v is not ...}


def one(result: IngestResult) -> dict[str, Any]:
    assert len(result.results) == 1
    return result.results[0]


def only_event(result: IngestResult) -> dict[str, Any]:
    (record,) = result.records
    (event,) = decode_record(record.value)["events"]
    return event


def code_of(payload: dict[str, Any], settings: Settings = S) -> str | None:
    """The rejection code of the single event of a v1 body, or None if accepted."""
    r = one(ingest_v1(payload, NOW, settings))
    return None if r["status"] == "accepted" else r["code"]


def api_error(fn: Any, *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------ decode_body


class TestDecodeBody:
    body = orjson.dumps(v1())

    @pytest.mark.parametrize(
        "ctype",
        [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            "text/plain",
            "text/plain;charset=UTF-8",
            'application/json; charset="utf-8"',
        ],
    )
    def test_json_media_types(self, ctype: str) -> None:
        assert decode_body(ctype, None, self.body, S) == v1()

    @pytest.mark.parametrize(
        "ctype",
        [
            None,
            "",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/html",
            "application/json; charset=latin-1",
        ],
    )
    def test_other_media_types_are_415(self, ctype: str | None) -> None:
        err = api_error(decode_body, ctype, None, self.body, S)
        assert (err.status, err.code) == (415, "unsupported_media_type")

    def test_body_size_limit_as_sent(self) -> None:
        small = Settings(max_body_bytes=len(self.body))
        assert decode_body("application/json", None, self.body, small) == v1()
        err = api_error(decode_body, "application/json", None, self.body + b" ", small)
        assert (err.status, err.code) == (413, "payload_too_large")

    def test_size_limit_applies_to_the_compressed_body(self) -> None:
        packed = gzip.compress(self.body)
        limit = Settings(max_body_bytes=len(packed))
        assert decode_body("application/json", "gzip", packed, limit) == v1()
        err = api_error(decode_body, "application/json", "gzip", packed, Settings(max_body_bytes=len(packed) - 1))
        assert err.code == "payload_too_large"

    @pytest.mark.parametrize("coding", ["gzip", "GZIP", "x-gzip", "gzip, identity", " gzip "])
    def test_gzip(self, coding: str) -> None:
        assert decode_body("application/json", coding, gzip.compress(self.body), S) == v1()

    def test_deflate_zlib_and_raw(self) -> None:
        assert decode_body("application/json", "deflate", zlib.compress(self.body), S) == v1()
        raw = zlib.compressobj(wbits=-15)
        packed = raw.compress(self.body) + raw.flush()
        assert decode_body("application/json", "deflate", packed, S) == v1()

    def test_identity_and_empty_encoding(self) -> None:
        for coding in (None, "", "identity"):
            assert decode_body("application/json", coding, self.body, S) == v1()

    def test_concatenated_gzip_members(self) -> None:
        half = len(self.body) // 2
        packed = gzip.compress(self.body[:half]) + gzip.compress(self.body[half:])
        assert decode_body("application/json", "gzip", packed, S) == v1()

    @pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "gzip, br"])
    def test_unknown_encoding_is_415(self, coding: str) -> None:
        err = api_error(decode_body, "application/json", coding, gzip.compress(self.body), S)
        assert (err.status, err.code) == (415, "unsupported_content_encoding")

    def test_corrupt_gzip(self) -> None:
        packed = bytearray(gzip.compress(self.body))
        packed[20] ^= 0xFF
        for bad in (bytes(packed), b"not gzip at all", gzip.compress(self.body)[:-12], b""):
            err = api_error(decode_body, "application/json", "gzip", bad, S)
            assert (err.status, err.code) == (400, "invalid_gzip"), bad[:10]
        err = api_error(decode_body, "application/json", "gzip", gzip.compress(self.body) + b"junk", S)
        assert err.code == "invalid_gzip"

    def test_corrupt_deflate(self) -> None:
        err = api_error(decode_body, "application/json", "deflate", b"\x78\x9c garbage", S)
        assert (err.status, err.code) == (400, "invalid_deflate")

    def test_ratio_bomb(self) -> None:
        body = b'{"pad":"' + b"a" * 2_000_000 + b'"}'
        packed = gzip.compress(body, 9)
        assert len(body) / len(packed) > 100
        err = api_error(decode_body, "application/json", "gzip", packed, S)
        assert (err.status, err.code) == (413, "compression_ratio_exceeded")

    def test_ratio_at_the_limit_passes(self) -> None:
        body = b'{"pad":"' + b"a" * 200_000 + b'"}'
        packed = gzip.compress(body, 9)
        exact = -(-len(body) // len(packed))  # smallest integer ratio that allows it
        assert decode_body("application/json", "gzip", packed, Settings(max_compression_ratio=exact))
        err = api_error(decode_body, "application/json", "gzip", packed, Settings(max_compression_ratio=exact - 1))
        assert err.code == "compression_ratio_exceeded"

    def test_decompressed_size_limit(self) -> None:
        body = orjson.dumps({"events": [{"n": i} for i in range(5000)]})
        packed = gzip.compress(body)
        roomy = Settings(max_compression_ratio=10_000, max_decompressed_bytes=len(body))
        assert decode_body("application/json", "gzip", packed, roomy)
        tight = Settings(max_compression_ratio=10_000, max_decompressed_bytes=len(body) - 1)
        err = api_error(decode_body, "application/json", "gzip", packed, tight)
        assert (err.status, err.code) == (413, "decompressed_too_large")

    def test_bomb_is_never_allocated(self) -> None:
        # ~1 GiB of zeros in ~1 MiB of gzip: refused after at most max_decompressed_bytes of output.
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
        chunk = bytes(1 << 20)
        packed = b"".join(comp.compress(chunk) for _ in range(1000)) + comp.flush()
        settings = Settings(max_body_bytes=len(packed), max_compression_ratio=10**6)
        tracemalloc.start()
        try:
            err = api_error(decode_body, "application/json", "gzip", packed, settings)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err.code == "decompressed_too_large"
        assert peak < 3 * settings.max_decompressed_bytes

    @pytest.mark.parametrize(
        "raw",
        [b"", b"{", b'{"a":1', b"{'a': 1}", b'{"a":1}x', b"\xff\xfe", b'{"a":tru}', b"[" * 2000 + b"]" * 2000],
    )
    def test_malformed_json(self, raw: bytes) -> None:
        err = api_error(decode_body, "application/json", None, raw, S)
        assert (err.status, err.code) == (400, "malformed_json")
        assert "char" in err.message  # orjson names the position

    @pytest.mark.parametrize(
        "raw", [b'{"value": NaN}', b'{"value": Infinity}', b'{"value": -Infinity}', b'{"value": 1e999}', b"[1, -1e400]"]
    )
    def test_non_finite_numbers(self, raw: bytes) -> None:
        err = api_error(decode_body, "application/json", None, raw, S)
        assert (err.status, err.code) == (400, "non_finite_value")


# ------------------------------------------------------------------------------------------- /v1 envelope


class TestV1Envelope:
    @pytest.mark.parametrize("payload", [[], "x", 1, None, [v1()]])
    def test_body_must_be_an_object(self, payload: Any) -> None:
        err = api_error(ingest_v1, payload, NOW, S)
        assert (err.status, err.code) == (400, "invalid_body")
        assert err.details[0]["field"] == "body"

    @pytest.mark.parametrize("events", [..., None, [], {}, "x", 3])
    def test_events_missing_empty_or_not_a_list(self, events: Any) -> None:
        body = v1()
        if events is ...:
            del body["events"]
        else:
            body["events"] = events
        err = api_error(ingest_v1, body, NOW, S)
        assert (err.status, err.code, err.details[0]["field"]) == (400, "invalid_events", "events")

    def test_batch_size_limit(self) -> None:
        at = v1(*[ev() for _ in range(S.max_events_per_batch)])
        assert ingest_v1(at, NOW, S).accepted == S.max_events_per_batch
        err = api_error(ingest_v1, v1(*[ev() for _ in range(S.max_events_per_batch + 1)]), NOW, S)
        assert (err.status, err.code, err.details[0]["field"]) == (413, "too_many_events", "events")

    def test_anonymous_user_id(self) -> None:
        assert ingest_v1(v1(anonymous_user_id="u" * S.max_id_length), NOW, S).accepted == 1
        for bad, code in [
            ("u" * (S.max_id_length + 1), "invalid_anonymous_user_id"),
            ("", "invalid_anonymous_user_id"),
            ("   ", "invalid_anonymous_user_id"),
            (42, "invalid_anonymous_user_id"),
            (["u"], "invalid_anonymous_user_id"),
            (None, "missing_anonymous_user_id"),
            (..., "missing_anonymous_user_id"),
        ]:
            err = api_error(ingest_v1, v1(anonymous_user_id=bad), NOW, S)
            assert (err.status, err.code, err.details[0]["field"]) == (400, code, "anonymous_user_id"), bad

    @pytest.mark.parametrize("key", ["session_id", "app_version", "install_id"])
    def test_context_ids(self, key: str) -> None:
        assert ingest_v1(v1(**{key: "x" * S.max_id_length}), NOW, S).accepted == 1
        assert ingest_v1(v1(**{key: None}), NOW, S).accepted == 1
        for bad in ("x" * (S.max_id_length + 1), "", 5, {"a": 1}):
            err = api_error(ingest_v1, v1(**{key: bad}), NOW, S)
            assert (err.code, err.details[0]["field"]) == (f"invalid_{key}", key)

    def test_platform(self) -> None:
        for ok in ("ios", "android", None):
            assert ingest_v1(v1(platform=ok), NOW, S).accepted == 1
        for bad in ("web", "iOS", "", 1, ["ios"]):
            err = api_error(ingest_v1, v1(platform=bad), NOW, S)
            assert (err.status, err.code) == (400, "invalid_platform")

    def test_sent_at(self) -> None:
        assert api_error(ingest_v1, v1(sent_at="yesterday"), NOW, S).code == "invalid_sent_at"
        assert api_error(ingest_v1, v1(sent_at="2026-02-19T10:15:30"), NOW, S).code == "naive_sent_at"
        assert api_error(ingest_v1, v1(sent_at=1.5), NOW, S).code == "invalid_sent_at"

    def test_sent_at_window(self) -> None:
        """sent_at obeys occurred_at's window: far off, it would "correct" a good occurred_at into another century
        (a device clock reading 9999-12-31 once put events in year 0000, which no Date column holds)."""
        future, age = S.max_future_skew_s * 1000, S.max_event_age_s * 1000
        for ok in (NOW + future, NOW - age, iso(NOW + future)):
            sent_ms = ok if type(ok) is int else NOW + future
            assert ingest_v1(v1(ev(occurred_at=sent_ms), sent_at=ok), NOW, S).accepted == 1
        for bad, code in (
            (NOW + future + 1, "sent_at_in_future"),
            ("9999-12-31T23:59:59Z", "sent_at_in_future"),
            (NOW - age - 1, "sent_at_too_old"),
            (0, "sent_at_too_old"),
        ):
            err = api_error(ingest_v1, v1(sent_at=bad), NOW, S)
            assert (err.status, err.code, err.details[0]["field"]) == (400, code, "sent_at")
        result = ingest_apiv1_batch([ark(sent_at="2090-01-01T00:00:00Z"), ark()], NOW, S)
        assert [(r["status"], r.get("code"), r.get("field")) for r in result.results] == [
            ("rejected", "sent_at_in_future", "0.sent_at"),
            ("accepted", None, None),
        ]

    def test_corrected_time_window(self) -> None:
        """Each time within its window is not enough: occurred_at + (received_at - sent_at) must be too. Ahead of
        the receive time means an event after the send of its batch (device clock); stored, it sat ~30 days in
        the future. Per event: the batch's other events stand."""
        future, age = S.max_future_skew_s * 1000, S.max_event_age_s * 1000
        sent = NOW - 29 * 86_400_000  # a device clock 29 days slow: corrected times move 29 days later
        cases = [
            (sent + future, None),  # 300 s after sent_at: corrected to exactly 300 s ahead, the boundary
            (sent + future + 1, "occurred_at_after_sent_at"),
            (iso(sent + future + 1000), "occurred_at_after_sent_at"),
            (sent - 1000, None),
        ]
        result = ingest_v1(v1(*(ev(occurred_at=t) for t, _ in cases), sent_at=sent), NOW, S)
        assert [(r.get("code"), r.get("field")) for r in result.results] == [
            (code, f"events.{i}.occurred_at" if code else None) for i, (_, code) in enumerate(cases)
        ]
        stored = orjson.loads(result.records[0].value)["events"]
        assert [e["corrected_at_ms"] for e in stored] == [NOW + future, NOW - 1000]
        # a device clock 290 s fast: an occurred_at at the age limit is older than it once corrected
        sent = NOW + 290_000
        old_ok, old_bad = NOW - age + 290_000, NOW - age + 289_999
        result = ingest_v1(v1(ev(occurred_at=old_ok), ev(occurred_at=old_bad), sent_at=sent), NOW, S)
        assert [r.get("code") for r in result.results] == [None, "occurred_at_too_old"]
        # ArkForge: sent_at per event; the timestamp alias names its field
        rows = ingest_apiv1_batch(
            [ark(occurred_at=NOW, sent_at=NOW - 3_600_000), ark(timestamp=NOW - 3_600_000, sent_at=NOW - 3_600_000)],
            NOW,
            S,
        ).results
        assert [(r.get("code"), r.get("field")) for r in rows] == [
            ("occurred_at_after_sent_at", "0.occurred_at"),
            (None, None),
        ]

    def test_unknown_fields_are_ignored(self) -> None:
        assert ingest_v1(v1(ev(extra=1), whatever={"x": 1}), NOW, S).accepted == 1


# ---------------------------------------------------------------------------------------- /v1 per event


class TestOccurredAt:
    def test_future_skew_boundary(self) -> None:
        limit = S.max_future_skew_s * 1000
        assert code_of(v1(ev(occurred_at=iso(NOW + limit)))) is None  # exactly 300 s ahead: accepted
        assert code_of(v1(ev(occurred_at=NOW + limit))) is None
        assert code_of(v1(ev(occurred_at=iso(NOW + limit + 1)))) == "occurred_at_in_future"
        assert code_of(v1(ev(occurred_at=iso(NOW + limit + 1000)))) == "occurred_at_in_future"  # 301 s
        assert code_of(v1(ev(occurred_at=NOW + limit + 1000))) == "occurred_at_in_future"

    def test_age_boundary(self) -> None:
        horizon = S.max_event_age_s * 1000
        assert code_of(v1(ev(occurred_at=iso(NOW - horizon)))) is None
        assert code_of(v1(ev(occurred_at=NOW - horizon))) is None
        assert code_of(v1(ev(occurred_at=iso(NOW - horizon - 1)))) == "occurred_at_too_old"
        assert code_of(v1(ev(occurred_at=NOW - horizon - 1))) == "occurred_at_too_old"

    def test_limits_come_from_settings(self) -> None:
        tight = Settings(max_future_skew_s=10, max_event_age_s=60)
        assert code_of(v1(ev(occurred_at=NOW + 10_000)), tight) is None
        assert code_of(v1(ev(occurred_at=NOW + 10_001)), tight) == "occurred_at_in_future"
        assert code_of(v1(ev(occurred_at=NOW - 60_001)), tight) == "occurred_at_too_old"

    def test_epoch_seconds_get_a_hint(self) -> None:
        r = one(ingest_v1(v1(ev(occurred_at=NOW // 1000)), NOW, S))
        assert r["code"] == "occurred_at_too_old" and "SECONDS" in r["message"]

    @pytest.mark.parametrize(
        "value",
        [
            "2026-02-19T10:15:29.000Z",
            "2026-02-19T11:15:29+01:00",
            "2026-02-19 10:15:29Z",
            "2026-02-19T10:15:29.5-00:00",
            "20260219T101529Z",
            "2026-02-19T10:15:29.123456789Z",
            "2026-02-19t10:15:29.000z",  # RFC 3339 allows lower case
            NOW - 1000,
            NOW,
        ],
    )
    def test_accepted_forms(self, value: Any) -> None:
        assert code_of(v1(ev(occurred_at=value))) is None

    @pytest.mark.parametrize(
        ("value", "code"),
        [
            ("2026-02-19T10:15:29", "naive_occurred_at"),
            ("2026-02-19", "naive_occurred_at"),
            ("yesterday", "invalid_occurred_at"),
            ("2026-02-30T10:00:00Z", "invalid_occurred_at"),
            ("2026-02-19T24:00:00Z", "invalid_occurred_at"),
            (str(NOW), "invalid_occurred_at"),  # digit strings: seconds or ms? refused
            (float(NOW), "invalid_occurred_at"),
            (True, "invalid_occurred_at"),
            (-1, "invalid_occurred_at"),
            (2**70, "invalid_occurred_at"),
            ({"t": 1}, "invalid_occurred_at"),
            ("2026-02-19T10:15:29Z" + " " * 100, "invalid_occurred_at"),
            ("", "invalid_occurred_at"),
            (None, "missing_occurred_at"),
            (..., "missing_occurred_at"),
        ],
    )
    def test_rejected_forms(self, value: Any, code: str) -> None:
        r = one(ingest_v1(v1(ev(occurred_at=value)), NOW, S))
        assert (r["status"], r["code"], r["field"]) == ("rejected", code, "events.0.occurred_at")

    def test_timestamp_ms_is_exact(self) -> None:
        assert timestamp_ms("2026-02-19T10:15:30.123Z") == NOW + 123
        assert timestamp_ms("2026-02-19T11:15:30.1239+01:00") == NOW + 123  # floored to the millisecond
        assert timestamp_ms("1969-12-31T23:59:59.9995Z") == -1  # floor, not truncation toward zero
        assert timestamp_ms(NOW) == NOW


class TestNames:
    @pytest.mark.parametrize(
        "name", ["a", "session_submitted", "$pageview", "Checkout.Completed", "ns:evt-1", "a" * 128, "A1_.:$-"]
    )
    def test_valid(self, name: str) -> None:
        assert code_of(v1(ev(event_name=name))) is None

    @pytest.mark.parametrize(
        "name", ["a" * 129, "", "1abc", "_x", "a b", "a\n", "a\t", "émoji", "a/b", "a;drop", 5, ["a"], {"a": 1}, True]
    )
    def test_invalid(self, name: Any) -> None:
        r = one(ingest_v1(v1(ev(event_name=name)), NOW, S))
        assert (r["code"], r["field"]) == ("invalid_event_name", "events.0.event_name")

    def test_missing(self) -> None:
        for payload in (v1(ev(event_name=None)), v1(ev(event_name=...))):
            assert code_of(payload) == "missing_event_name"


class TestObjects:
    @pytest.mark.parametrize("key", ["properties", "context"])
    def test_size_boundary(self, key: str) -> None:
        limit = S.max_properties_bytes
        at = {"k": "x" * (limit - len(b'{"k":""}'))}
        assert len(orjson.dumps(at)) == limit
        assert code_of(v1(ev(**{key: at}))) is None
        over = {"k": "x" * (limit + 1 - len(b'{"k":""}'))}
        r = one(ingest_v1(v1(ev(**{key: over})), NOW, S))
        assert (r["code"], r["field"]) == (f"{key}_too_large", f"events.0.{key}")

    @staticmethod
    def nested(depth: int) -> dict[str, Any]:
        obj: dict[str, Any] = {"leaf": 1}
        for _ in range(depth - 1):
            obj = {"n": obj}
        return obj

    @pytest.mark.parametrize("key", ["properties", "context"])
    def test_depth_boundary(self, key: str) -> None:
        assert code_of(v1(ev(**{key: self.nested(S.max_json_depth)}))) is None
        assert code_of(v1(ev(**{key: self.nested(S.max_json_depth + 1)}))) == f"{key}_too_deep"
        lists: Any = [1]
        for _ in range(S.max_json_depth - 2):
            lists = [lists]
        assert code_of(v1(ev(**{key: {"l": lists}}))) is None
        assert code_of(v1(ev(**{key: {"l": [lists]}}))) == f"{key}_too_deep"

    def test_depth_beyond_what_orjson_serialises(self) -> None:
        payload = decode_body(
            "application/json",
            None,
            orjson.dumps(v1(ev())).replace(
                b'"occurred_at"', b'"properties":' + b'{"a":' * 600 + b"1" + b"}" * 600 + b',"occurred_at"'
            ),
            S,
        )
        assert code_of(payload) == "properties_too_deep"

    def test_braces_inside_strings_are_not_depth(self) -> None:
        assert code_of(v1(ev(properties={"s": "{[" * 50, "t": ["{{{{{{{{{{"]}))) is None

    @pytest.mark.parametrize("key", ["properties", "context"])
    @pytest.mark.parametrize("value", [[], [1], "x", 1, True, 1.5])
    def test_must_be_objects(self, key: str, value: Any) -> None:
        assert code_of(v1(ev(**{key: value}))) == f"invalid_{key}"

    def test_non_json_python_values_from_direct_callers(self) -> None:
        for value in ({"a": {1, 2}}, {"a": b"bytes"}):
            result = ingest_v1(v1(ev(properties=value)), NOW, S)
            assert one(result)["code"] == "invalid_properties"
            assert decode_record(result.rejected_records[0].value)["raw"].startswith("<not serialisable")

    def test_absent_null_and_empty_are_empty_objects(self) -> None:
        for value in (..., None, {}):
            event = only_event(ingest_v1(v1(ev(properties=value, context=value)), NOW, S))
            assert event["properties"] == {} and event["context"] == {}


class TestEventId:
    def test_lengths(self) -> None:
        assert code_of(v1(ev(event_id="e" * S.max_id_length))) is None
        for bad in ("e" * (S.max_id_length + 1), "", " ", 42, ["e"]):
            r = one(ingest_v1(v1(ev(event_id=bad)), NOW, S))
            assert (r["code"], r["field"]) == ("invalid_event_id", "events.0.event_id"), bad

    def test_null_means_server_assigned(self) -> None:
        event = only_event(ingest_v1(v1(ev(event_id=None)), NOW, S))
        assert event["event_id_source"] == "server"


# --------------------------------------------------------------------------------- batches, stamps, records


class TestBatches:
    def test_one_bad_event_never_rejects_its_neighbours(self) -> None:
        body = v1(
            ev(event_id="a"),
            ev(event_name="bad name", event_id="b"),
            ev(event_id="c", occurred_at=iso(NOW + 3_600_000)),
            "not an object",
            ev(event_id="d", properties=[1]),
            ev(event_id="e"),
        )
        result = ingest_v1(body, NOW, S)
        assert (result.accepted, result.rejected, result.duplicates) == (2, 4, 0)
        assert [r["status"] for r in result.results] == [
            "accepted",
            "rejected",
            "rejected",
            "rejected",
            "rejected",
            "accepted",
        ]
        assert [r["index"] for r in result.results] == list(range(6))
        assert [(r.get("code"), r.get("field")) for r in result.results if r["status"] == "rejected"] == [
            ("invalid_event_name", "events.1.event_name"),
            ("occurred_at_in_future", "events.2.occurred_at"),
            ("invalid_event", "events.3"),
            ("invalid_properties", "events.4.properties"),
        ]
        (record,) = result.records
        assert [e["event_id"] for e in decode_record(record.value)["events"]] == ["a", "e"]
        assert record.event_ids == ("a", "e")
        assert len(result.rejected_records) == 4

    def test_rejected_records(self) -> None:
        bad = ev(event_name="bad name", properties={"p": 1})
        result = ingest_v1(v1(ev(), bad), NOW, S)
        (rej,) = result.rejected_records
        assert rej.key == b"550e8400-e29b-41d4-a716-446655440000"
        value = decode_record(rej.value)
        RejectedRecord.model_validate(value)
        assert value == {
            "v": 1,
            "surface": "v1",
            "received_at_ms": NOW,
            "scope": "event",
            "index": 1,
            "code": "invalid_event_name",
            "field": "events.1.event_name",
            "message": value["message"],
            "user_id": "550e8400-e29b-41d4-a716-446655440000",
            "raw": orjson.dumps(bad).decode(),
            "raw_truncated": False,
        }

    def test_rejected_raw_is_truncated(self) -> None:
        result = ingest_v1(v1(ev(properties={"k": "é" * 20_000})), NOW, S)
        value = decode_record(result.rejected_records[0].value)
        assert value["code"] == "properties_too_large" and value["raw_truncated"] is True
        assert len(value["raw"].encode()) <= REJECTED_RAW_MAX_BYTES

    def test_all_rejected_publishes_no_event_record(self) -> None:
        result = ingest_v1(v1(ev(event_name=""), ev(occurred_at="x")), NOW, S)
        assert result.records == [] and result.accepted == 0 and result.rejected == 2
        assert result.body()["rejected"] == 2  # nothing to publish: answerable at once


class TestStamps:
    def test_received_at_and_server_ids(self) -> None:
        result = ingest_v1(v1(ev(), ev(), ev(event_id="client-1")), NOW, S)
        record = decode_record(result.records[0].value)
        assert record["received_at_ms"] == NOW and record["surface"] == "v1" and record["v"] == 1
        ids = [e["event_id"] for e in record["events"]]
        assert [e["event_id_source"] for e in record["events"]] == ["server", "server", "client"]
        assert ids[2] == "client-1" and len(set(ids)) == 3
        for server_id in ids[:2]:
            u = uuid.UUID(server_id)
            assert u.version == 7 and u.variant == uuid.RFC_4122
            assert u.int >> 80 == NOW  # the 48-bit timestamp is received_at
            assert str(u) == server_id
        assert [r["event_id"] for r in result.results] == ids
        assert ids[0] < ids[1]  # time-ordered, and in request order within a request

    def test_server_ids_differ_across_requests(self) -> None:
        a = only_event(ingest_v1(v1(), NOW, S))["event_id"]
        b = only_event(ingest_v1(v1(), NOW, S))["event_id"]
        assert a != b

    def test_skew_and_correction(self) -> None:
        occurred = NOW - 10_000
        # device clock 2 s behind: sent_at reads NOW - 2 s when the server reads NOW
        event = only_event(ingest_v1(v1(ev(occurred_at=iso(occurred)), sent_at=iso(NOW - 2000)), NOW, S))
        assert (event["skew_ms"], event["corrected_at_ms"]) == (2000, occurred + 2000)
        assert event["sent_at"] == iso(NOW - 2000) and event["occurred_at_ms"] == occurred
        # device clock 90 s ahead, epoch-ms sent_at
        event = only_event(ingest_v1(v1(ev(occurred_at=occurred), sent_at=NOW + 90_000), NOW, S))
        assert (event["skew_ms"], event["corrected_at_ms"]) == (-90_000, occurred - 90_000)

    def test_no_sent_at_no_correction(self) -> None:
        event = only_event(ingest_v1(v1(), NOW, S))
        assert event["sent_at"] is None and event["skew_ms"] is None and event["corrected_at_ms"] is None

    def test_record_event_is_self_contained(self) -> None:
        body = v1(ev(), session_id="s1", app_version="1.4.2", install_id="i1", platform="android")
        event = only_event(ingest_v1(body, NOW, S))
        assert {k: event[k] for k in ("session_id", "platform", "app_version", "install_id", "kind")} == {
            "session_id": "s1",
            "platform": "android",
            "app_version": "1.4.2",
            "install_id": "i1",
            "kind": "event",
        }
        assert event["experiment_id"] is None and event["metric_name"] is None and event["value"] is None


class TestRecords:
    def test_round_trip_preserves_posted_values_exactly(self) -> None:
        props = {
            "zeta": 1,
            "alpha": [1.5, -0.0, 1e-7, 2**63, -(2**63), 'é🙂\u2028"\\/'],
            "nested": {"b": None, "a": True},
            "": "empty key",
            "float": 100.0,
            "big": 1.7976931348623157e308,
        }
        context = {"locale": "fr-FR", "screen": {"w": 390, "h": 844}}
        posted = orjson.dumps(v1(ev(properties=props, context=context, occurred_at="2026-02-19T11:15:29+01:00")))
        result = ingest_v1(decode_body("application/json", None, posted, S), NOW, S)
        record = decode_record(result.records[0].value)
        event = record["events"][0]
        assert event["properties"] == props and list(event["properties"]) == list(props)  # key order too
        assert orjson.dumps(event["properties"]) == orjson.dumps(props)
        assert event["context"] == context
        assert event["occurred_at"] == "2026-02-19T11:15:29+01:00" and event["occurred_at_ms"] == NOW - 1000
        EventRecord.model_validate(record)  # the documented schema describes what is produced

    def test_record_schema_keys(self) -> None:
        event = only_event(ingest_v1(v1(), NOW, S))
        assert tuple(event) == RECORD_EVENT_KEYS == tuple(RecordEvent.model_fields)
        assert tuple(only_event(ingest_apiv1_one(ark(), NOW, S))) == RECORD_EVENT_KEYS
        track = ingest_track({"user_id": "u", "metric_name": "m", "value": 1}, "t", NOW, S)
        assert tuple(only_event(track)) == RECORD_EVENT_KEYS

    def test_decode_record_checks_version(self) -> None:
        with pytest.raises(UnsupportedRecordVersion):
            decode_record(encode_record({"v": 2, "events": []}))
        with pytest.raises(ValueError):
            decode_record(b"[1]")
        with pytest.raises(ValueError):
            decode_record(b"garbage")

    def test_dedup_is_scoped_by_user_unambiguously(self) -> None:
        """Ids are kept per user: ("ab", "c") is not ("a", "bc"), nor the same id of another user."""
        cache = DedupCache(10)
        cache.remember("ab", ["c"])
        cache.remember("1:a", ["b"])
        assert cache.seen("ab", "c") and cache.seen("1:a", "b")
        assert not cache.seen("a", "bc") and not cache.seen("1", ":ab") and not cache.seen("other", "c")
        cache.remember("solo", ["abc"])  # one id is kept as the string itself: no substring matches
        assert cache.seen("solo", "abc") and not cache.seen("solo", "b") and not cache.seen("solo", "")
        cache.remember("solo", ["d"])
        assert cache.seen("solo", "abc") and cache.seen("solo", "d") and len(cache) == 4

    def test_large_user_batch_is_split(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(ingest_mod, "MAX_RECORD_BYTES", 2000)
        events = [ev(event_id=f"e{i}", properties={"pad": "x" * 300}) for i in range(20)]
        result = ingest_v1(v1(*events), NOW, S, DedupCache(100))
        assert len(result.records) > 1
        assert {r.key for r in result.records} == {b"550e8400-e29b-41d4-a716-446655440000"}
        seen = [e["event_id"] for r in result.records for e in decode_record(r.value)["events"]]
        assert seen == [f"e{i}" for i in range(20)]
        assert all(len(r.value) <= 2000 for r in result.records)
        user = "550e8400-e29b-41d4-a716-446655440000"
        assert [i for r in result.records for i in r.client_event_ids] == seen
        assert {r.user_id for r in result.records} == {user}
        assert [i for r in result.records for i in r.event_ids] == seen


class TestDuplicates:
    def test_in_request(self) -> None:
        result = ingest_v1(v1(ev(event_id="x"), ev(event_id="y"), ev(event_id="x")), NOW, S, DedupCache(10))
        assert (result.accepted, result.rejected, result.duplicates) == (3, 0, 1)
        assert result.results[2] == {"index": 2, "status": "accepted", "event_id": "x", "duplicate": True}
        assert result.records[0].event_ids == ("x", "y")
        # without a cache the in-request check still applies
        assert ingest_v1(v1(ev(event_id="x"), ev(event_id="x")), NOW, S).duplicates == 1

    def test_remember_only_after_ack(self) -> None:
        cache = DedupCache(10)
        body = v1(ev(event_id="a"), ev(event_id="b"))
        first = ingest_v1(body, NOW, S, cache)
        with pytest.raises(RuntimeError):
            first.body()  # the route must publish and acknowledge first
        # Kafka failed: 503, acknowledge() never called -> the retry publishes everything again
        retry = ingest_v1(body, NOW, S, cache)
        assert retry.duplicates == 0 and retry.records[0].event_ids == ("a", "b")
        retry.acknowledge(cache)
        assert retry.body()["accepted"] == 2
        assert len(cache) == 2 and cache.seen("550e8400-e29b-41d4-a716-446655440000", "a")
        # a second retry (lost answer) is all duplicates: nothing to publish, answered accepted
        again = ingest_v1(v1(ev(event_id="a"), ev(event_id="b"), ev(event_id="c")), NOW, S, cache)
        assert (again.accepted, again.duplicates) == (3, 2)
        assert [r["duplicate"] for r in again.results] == [True, True, False]
        assert again.records[0].event_ids == ("c",)
        again.acknowledge(cache)
        assert IngestResponse.model_validate(again.body()).duplicates == 2

    def test_partial_ack_remembers_acked_records(self) -> None:
        cache = DedupCache(10)
        result = ingest_apiv1_batch(
            [{"event_type": "e", "user_id": u, "event_id": "same"} for u in ("u1", "u2")], NOW, S, cache
        )
        acked = result.records[0]  # only u1's record was acknowledged
        cache.remember(acked.user_id, acked.client_event_ids)
        retry = ingest_apiv1_batch(
            [{"event_type": "e", "user_id": u, "event_id": "same"} for u in ("u1", "u2")], NOW, S, cache
        )
        assert [r["duplicate"] for r in retry.results] == [True, False]
        assert [r.key for r in retry.records] == [b"u2"]

    def test_scoped_by_user(self) -> None:
        cache = DedupCache(10)
        ingest_v1(v1(ev(event_id="1")), NOW, S, cache).acknowledge(cache)
        other = ingest_v1(v1(ev(event_id="1"), anonymous_user_id="someone-else"), NOW, S, cache)
        assert other.duplicates == 0

    def test_server_ids_are_never_duplicates(self) -> None:
        cache = DedupCache(10)
        first = ingest_v1(v1(ev(), ev()), NOW, S, cache)
        first.acknowledge(cache)
        assert len(cache) == 0 and first.duplicates == 0

    def test_cache_is_bounded(self) -> None:
        cache = DedupCache(4)  # two generations of 2
        cache.remember("u", ["1", "2"])  # fills the young generation: it becomes the old one
        cache.remember("v", ["3"])
        assert len(cache) == 3 and cache.seen("u", "1") and cache.seen("u", "2") and cache.seen("v", "3")
        cache.remember("u", ["4", "5"])  # rotates again: 1 and 2 are forgotten
        assert [cache.seen("u", k) for k in "12345"] == [False, False, False, True, True]
        assert cache.seen("v", "3")
        assert len(cache) <= cache.capacity
        for i in range(1000):
            cache.remember(f"user{i % 7}", [str(i)])
            assert len(cache) <= cache.capacity and cache.seen(f"user{i % 7}", str(i))
            assert i == 0 or cache.seen(f"user{(i - 1) % 7}", str(i - 1))  # the last capacity // 2 are known
        cache.remember("u", [])
        assert len(cache) <= cache.capacity
        assert DedupCache.from_settings(S).capacity == S.dedup_cache_size
        off = DedupCache(0)
        off.remember("u", ["1"])
        assert not off.seen("u", "1") and len(off) == 0


# --------------------------------------------------------------------------------------------- ArkForge


def ark(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_type": "button_click",
        "user_id": "user123",
        "session_id": "session456",
        "properties": {"button_name": "submit", "page": "homepage"},
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


class TestArkForge:
    def test_seed_example(self) -> None:
        result = ingest_apiv1_one(ark(), NOW, S)
        assert result.single_error() is None and result.accepted == 1
        event = only_event(result)
        record = decode_record(result.records[0].value)
        assert record["surface"] == "apiv1" and record["user_id"] == "user123" and result.records[0].key == b"user123"
        assert event["event_name"] == "button_click" and event["session_id"] == "session456"
        assert event["properties"] == {"button_name": "submit", "page": "homepage"}
        # no occurred_at: it happened when received
        assert event["occurred_at"] is None and event["occurred_at_ms"] == NOW and event["corrected_at_ms"] is None
        EventRecord.model_validate(record)

    def test_occurred_at_timestamp_alias_and_event_id(self) -> None:
        event = only_event(ingest_apiv1_one(ark(timestamp=NOW - 5, event_id="k1"), NOW, S))
        assert (event["occurred_at"], event["occurred_at_ms"], event["event_id"]) == (NOW - 5, NOW - 5, "k1")
        event = only_event(ingest_apiv1_one(ark(occurred_at=iso(NOW - 7), timestamp="junk"), NOW, S))
        assert event["occurred_at_ms"] == NOW - 7  # occurred_at wins, timestamp is not looked at
        result = ingest_apiv1_one(ark(timestamp=iso(NOW + 301_000)), NOW, S)
        assert (one(result)["code"], one(result)["field"]) == ("occurred_at_in_future", "timestamp")

    def test_sent_at_correction(self) -> None:
        event = only_event(ingest_apiv1_one(ark(occurred_at=NOW - 100, sent_at=NOW - 50), NOW, S))
        assert (event["skew_ms"], event["corrected_at_ms"]) == (50, NOW - 50)

    @pytest.mark.parametrize(
        ("change", "code", "field"),
        [
            ({"event_type": ...}, "missing_event_type", "event_type"),
            ({"event_type": "has space"}, "invalid_event_type", "event_type"),
            ({"user_id": ...}, "missing_user_id", "user_id"),
            ({"user_id": None}, "missing_user_id", "user_id"),
            ({"user_id": ""}, "invalid_user_id", "user_id"),
            ({"user_id": "u" * 129}, "invalid_user_id", "user_id"),
            ({"user_id": 123}, "invalid_user_id", "user_id"),
            ({"session_id": ""}, "invalid_session_id", "session_id"),
            ({"properties": "x"}, "invalid_properties", "properties"),
            ({"event_id": ""}, "invalid_event_id", "event_id"),
            ({"occurred_at": "2026-02-19T10:00:00"}, "naive_occurred_at", "occurred_at"),
            ({"sent_at": "soon"}, "invalid_sent_at", "sent_at"),
        ],
    )
    def test_single_event_rejections(self, change: dict[str, Any], code: str, field: str) -> None:
        result = ingest_apiv1_one(ark(**change), NOW, S)
        assert (one(result)["code"], one(result)["field"]) == (code, field)
        err = result.single_error()
        assert err is not None and (err.status, err.code, err.details[0]["field"]) == (400, code, field)
        assert result.records == [] and len(result.rejected_records) == 1

    def test_single_must_be_an_object(self) -> None:
        for payload in ([ark()], "x", None):
            err = api_error(ingest_apiv1_one, payload, NOW, S)
            assert (err.status, err.code) == (400, "invalid_body")

    def test_batch_groups_by_user_in_first_seen_order(self) -> None:
        users = ["bob", "amy", "bob", "cy", "amy", "bob"]
        batch = [ark(user_id=u, event_id=f"{u}-{i}") for i, u in enumerate(users)]
        result = ingest_apiv1_batch(batch, NOW, S)
        assert [r.key for r in result.records] == [b"bob", b"amy", b"cy"]
        for record in result.records:
            value = decode_record(record.value)
            assert value["user_id"] == record.key.decode()
            assert [e["event_id"] for e in value["events"]] == [
                f"{u}-{i}" for i, u in enumerate(users) if u == value["user_id"]
            ]
        assert [r["index"] for r in result.results] == list(range(6))

    def test_batch_envelope(self) -> None:
        for payload, code in [(ark(), "invalid_body"), ("x", "invalid_body"), ([], "invalid_events")]:
            err = api_error(ingest_apiv1_batch, payload, NOW, S)
            assert (err.status, err.code, err.details[0]["field"]) == (400, code, "body")
        assert ingest_apiv1_batch([ark()] * S.max_events_per_batch, NOW, S).accepted == S.max_events_per_batch
        err = api_error(ingest_apiv1_batch, [ark()] * (S.max_events_per_batch + 1), NOW, S)
        assert (err.status, err.code) == (413, "too_many_events")

    def test_batch_mixed(self) -> None:
        result = ingest_apiv1_batch([ark(), 7, ark(user_id=""), ark(event_type="ok2")], NOW, S)
        assert [(r["status"], r.get("field")) for r in result.results] == [
            ("accepted", None),
            ("rejected", "1"),
            ("rejected", "2.user_id"),
            ("accepted", None),
        ]
        assert result.single_error() is None
        rejected = [decode_record(r.value) for r in result.rejected_records]
        assert [r["user_id"] for r in rejected] == [None, None]
        assert [r.key for r in result.rejected_records] == [None, None]


class TestTrack:
    def test_metric_record(self) -> None:
        result = ingest_track({"user_id": "user123", "metric_name": "revenue", "value": 9.99}, "42", NOW, S)
        assert result.single_error() is None
        record = decode_record(result.records[0].value)
        assert record["surface"] == "track" and result.records[0].key == b"user123"
        event = record["events"][0]
        assert (event["kind"], event["experiment_id"], event["metric_name"], event["value"], event["event_name"]) == (
            "metric",
            "42",
            "revenue",
            9.99,
            "revenue",
        )
        assert event["occurred_at_ms"] == NOW
        EventRecord.model_validate(record)

    @pytest.mark.parametrize("value", [0, -3, 1.5, 2**53, -(2**53), float(2**53), -float(2**53), 1e15 + 0.5])
    def test_finite_numbers(self, value: float) -> None:
        result = ingest_track({"user_id": "u", "metric_name": "m", "value": value}, "t", NOW, S)
        assert only_event(result)["value"] == value

    @pytest.mark.parametrize(
        ("value", "code"),
        [
            (float("nan"), "non_finite_value"),
            (float("inf"), "non_finite_value"),
            (float("-inf"), "non_finite_value"),
            (9007199254740994.0, "value_out_of_range"),  # the next double after 2^53
            (-9007199254740994.0, "value_out_of_range"),
            (2**53 + 1, "value_out_of_range"),
            (-(2**53) - 1, "value_out_of_range"),
            (2**64 - 1, "value_out_of_range"),
            (1e160, "value_out_of_range"),  # its square overflowed sum_x2, stored as 0
            (1e308, "value_out_of_range"),
            (True, "invalid_value"),
            ("1.0", "invalid_value"),
            ([1], "invalid_value"),
            (2**64, "integer_out_of_range"),
            (-(2**63) - 1, "integer_out_of_range"),
            (None, "missing_value"),
            (..., "missing_value"),
        ],
    )
    def test_bad_values(self, value: Any, code: str) -> None:
        payload = {"user_id": "u", "metric_name": "m", "value": value}
        if value is ...:
            del payload["value"]
        err = ingest_track(payload, "t", NOW, S).single_error()
        assert err is not None and (err.status, err.code, err.details[0]["field"]) == (400, code, "value")

    def test_non_finite_in_the_body(self) -> None:
        for raw in (
            b'{"user_id":"u","metric_name":"m","value":NaN}',
            b'{"user_id":"u","metric_name":"m","value":1e999}',
        ):
            err = api_error(decode_body, "application/json", None, raw, S)
            assert (err.status, err.code) == (400, "non_finite_value")

    @pytest.mark.parametrize(
        ("name", "code"),
        [
            ("has space", "invalid_metric_name"),
            ("", "invalid_metric_name"),
            (7, "invalid_metric_name"),
            (None, "missing_metric_name"),
            ("m" * 129, "invalid_metric_name"),
        ],
    )
    def test_bad_metric_names(self, name: Any, code: str) -> None:
        err = ingest_track({"user_id": "u", "metric_name": name, "value": 1}, "t", NOW, S).single_error()
        assert err is not None and err.code == code

    def test_bad_user_and_test_id(self) -> None:
        err = ingest_track({"metric_name": "m", "value": 1}, "t", NOW, S).single_error()
        assert err is not None and err.code == "missing_user_id"
        for bad in ("", "x" * 129):
            assert api_error(ingest_track, {"user_id": "u", "metric_name": "m", "value": 1}, bad, NOW, S).code == (
                "invalid_test_id"
            )
        assert api_error(ingest_track, [1], "t", NOW, S).code == "invalid_body"

    def test_track_dedup(self) -> None:
        cache = DedupCache(10)
        payload = {"user_id": "u", "metric_name": "m", "value": 1, "event_id": "k"}
        ingest_track(payload, "t", NOW, S, cache).acknowledge(cache)
        again = ingest_track(payload, "t", NOW, S, cache)
        assert again.duplicates == 1 and again.records == [] and again.single_error() is None


class TestBigIntegers:
    """orjson reads an integer beyond 64 bits as a float: the gateway must refuse it, not store something else."""

    BIG = b"123456789012345678901234567890"

    def body(self, *properties: bytes) -> bytes:
        events = b",".join(b'{"event_name":"e","occurred_at":%d,"properties":%s}' % (NOW - 1000, p) for p in properties)
        return b'{"anonymous_user_id":"u","events":[%s]}' % events

    @pytest.mark.parametrize(
        ("literal", "ok"),
        [
            (b"18446744073709551615", True),  # 2^64 - 1
            (b"18446744073709551616", False),
            (b"-9223372036854775808", True),  # -2^63
            (b"-9223372036854775809", False),
            (b"9223372036854775808", True),  # 2^63: UInt64
            (b"123456789012345678901234567890", False),
            (b"1" + b"0" * 5000, False),  # more digits than int() reads
            (b"1234567890123456789012.5", True),  # a fraction is a float, as posted
            (b"1e30", True),
        ],
    )
    def test_boundaries_per_event(self, literal: bytes, ok: bool) -> None:
        body = self.body(b'{"n":%s}' % literal, b'{"n":1}')
        result = ingest_v1(decode_body("application/json", None, body, S, big_integers="mark"), NOW, S)
        first, second = result.results
        assert second["status"] == "accepted"  # one bad number never rejects its neighbour
        if ok:
            assert first["status"] == "accepted"
            posted = orjson.loads(literal)
            assert decode_record(result.records[0].value)["events"][0]["properties"]["n"] == posted
        else:
            assert (first["code"], first["field"]) == ("integer_out_of_range", "events.0.properties.n")
            raw = decode_record(result.rejected_records[0].value)["raw"]
            assert literal[:1000].decode() in raw  # the dead letter keeps the digits as sent

    def test_nested_path_and_context(self) -> None:
        body = self.body(b'{"a":[1,{"b":%s}]}' % self.BIG).replace(b'"properties"', b'"context"')
        result = ingest_v1(decode_body("application/json", None, body, S, big_integers="mark"), NOW, S)
        assert (one(result)["code"], one(result)["field"]) == ("integer_out_of_range", "events.0.context.a.1.b")

    def test_digits_in_strings_change_nothing(self) -> None:
        body = self.body(b'{"id":"%s","n":%s}' % (self.BIG, b"1" * 19))
        assert decode_body("application/json", None, body, S) == orjson.loads(body)
        result = ingest_v1(decode_body("application/json", None, body, S, big_integers="mark"), NOW, S)
        assert only_event(result)["properties"] == {"id": self.BIG.decode(), "n": int("1" * 19)}

    def test_refused_as_a_whole_outside_ingestion(self) -> None:
        err = api_error(decode_body, "application/json", None, b'{"attributes":{"x":[%s]}}' % self.BIG, S)
        assert (err.status, err.code, err.details[0]["field"]) == (400, "integer_out_of_range", "attributes.x.0")
        err = api_error(decode_body, "application/json", None, self.BIG, S)
        assert err.details[0]["field"] == "body"

    def test_gzip_body(self) -> None:
        body = gzip.compress(self.body(b'{"n":%s}' % self.BIG))
        result = ingest_v1(decode_body("application/json", "gzip", body, S, big_integers="mark"), NOW, S)
        assert one(result)["code"] == "integer_out_of_range"

    def test_numbers_beyond_the_double_range_are_per_event_too(self) -> None:
        body = self.body(b'{"n":1e999}', b'{"n":-1.5e400}', b'{"n":%s}' % (b"9" * 400), b'{"n":1.5e308}')
        result = ingest_v1(decode_body("application/json", None, body, S, big_integers="mark"), NOW, S)
        assert [(r["status"], r.get("code")) for r in result.results] == [
            ("rejected", "non_finite_value"),
            ("rejected", "non_finite_value"),
            ("rejected", "integer_out_of_range"),
            ("accepted", None),
        ]
        assert decode_record(result.rejected_records[0].value)["raw"].endswith('"properties":{"n":1e999}}')
        err = api_error(decode_body, "application/json", None, body, S)  # elsewhere: the whole request
        assert (err.code, err.details[0]["field"]) == ("non_finite_value", "events.0.properties.n")
        for not_json in (b"NaN", b"Infinity", b"-Infinity"):  # not JSON at all: the whole body
            raw = self.body(b'{"n":%s}' % not_json, b'{"n":1}')
            assert api_error(decode_body, "application/json", None, raw, S, big_integers="mark").code == (
                "non_finite_value"
            )

    def test_a_lone_surrogate_beside_a_huge_number_is_malformed_not_a_500(self) -> None:
        # orjson stops at the number; the standard library would read the surrogate that orjson refuses
        for body in (
            b'{"events":[{"event_name":"a","properties":{"n":%s}}],"anonymous_user_id":"\\ud800x"}' % (b"9" * 400),
            b'{"events":[{"event_name":"a","properties":{"n":1e999}}],"anonymous_user_id":"\\udfff"}',
        ):
            err = api_error(decode_body, "application/json", None, body, S, big_integers="mark")
            assert err.status == 400 and err.code in ("malformed_json", "non_finite_value")  # whichever comes first

    @pytest.mark.parametrize("depth", [253, 300, 1000])
    @pytest.mark.parametrize("number", [b"1e999", b"123456789012345678901234567890"])
    def test_deeply_nested_numbers_are_per_event_too(self, depth: int, number: bytes) -> None:
        """orjson writes 254 levels and Python's recursion limit is ~1,000, orjson reads 1,024: the re-read must not
        turn a deep number into a refusal of the whole request (it did, as "NaN and Infinity are not JSON")."""
        deep = b"[" * depth + number + b"]" * depth
        body = self.body(b'{"n":1}', b'{"a":%s}' % deep)
        result = ingest_v1(decode_body("application/json", None, body, S, big_integers="mark"), NOW, S)
        assert [(r["status"], r.get("code"), r.get("field")) for r in result.results] == [
            ("accepted", None, None),
            ("rejected", "properties_too_deep", "events.1.properties"),
        ]

    def test_a_refused_gzip_body_is_dead_lettered_as_json(self) -> None:
        sent = b'{"anonymous_user_id":"gz","events":[ broken'
        err = api_error(decode_body, "application/json", "gzip", gzip.compress(sent), S)
        assert err.code == "malformed_json" and err.sent == sent
        record = refused_request("v1", NOW, err, S)
        assert record is not None and decode_record(record.value)["raw"] == sent.decode()

    def test_track_value_and_arkforge(self) -> None:
        for value, code in ((self.BIG, "integer_out_of_range"), (b"1e999", "non_finite_value")):
            raw = b'{"user_id":"u","metric_name":"m","value":%s}' % value
            payload = decode_body("application/json", None, raw, S, big_integers="mark")
            err = ingest_track(payload, "t", NOW, S).single_error()
            assert err is not None and (err.code, err.details[0]["field"]) == (code, "value")
        raw = b'[{"event_type":"e","user_id":"u","properties":{"n":%s}},{"event_type":"e","user_id":"u"}]' % self.BIG
        result = ingest_apiv1_batch(decode_body("application/json", None, raw, S, big_integers="mark"), NOW, S)
        assert [r["status"] for r in result.results] == ["rejected", "accepted"]
        assert result.results[0]["field"] == "0.properties.n"


# ------------------------------------------------------------------------------ models agree with the core


GOOD_V1 = [
    ev(),
    ev(properties={"max": 2**64 - 1, "min": -(2**63)}),
    ev(event_id="e1", properties={"a": [1, {"b": 2}]}, context={"c": 1}),
    ev(occurred_at=NOW - 5),
    ev(event_name="$pageview"),
    ev(properties=None, context={}),
]
BAD_V1 = [
    ev(event_name="a b"),
    ev(event_name="a" * 129),
    ev(occurred_at="2026-02-19T10:00:00"),
    ev(occurred_at=1.5),
    ev(occurred_at=str(NOW)),
    ev(occurred_at=True),
    ev(event_id=""),
    ev(event_id="x" * 129),
    ev(properties=[]),
    ev(context="x"),
    ev(properties=TestObjects.nested(9)),
    ev(properties={"k": "x" * 20_000}),
    ev(occurred_at=...),
    ev(event_name=...),
    ev(properties={"n": 2**64}),
    ev(context={"l": [-(2**63) - 1]}),
]


class TestModelsMatchCore:
    @pytest.mark.parametrize("event", GOOD_V1)
    def test_good(self, event: dict[str, Any]) -> None:
        assert code_of(v1(event)) is None
        V1Event.model_validate(event)
        V1EventsRequest.model_validate(v1(event, sent_at=NOW))

    @pytest.mark.parametrize("event", BAD_V1)
    def test_bad(self, event: dict[str, Any]) -> None:
        assert code_of(v1(event)) is not None
        with pytest.raises(ValidationError):
            V1Event.model_validate(event)

    def test_arkforge_and_track_models(self) -> None:
        ApiV1Event.model_validate(ark())
        ApiV1EventBatch.model_validate([ark(), ark(timestamp=NOW)])
        TrackRequest.model_validate({"user_id": "u", "metric_name": "m", "value": 1.5})
        for bad in (float("nan"), float("inf"), True, "1", [1], 9007199254740994.0, -(2**63)):
            with pytest.raises(ValidationError):
                TrackRequest.model_validate({"user_id": "u", "metric_name": "m", "value": bad})
            assert ingest_track({"user_id": "u", "metric_name": "m", "value": bad}, "t", NOW, S).single_error()
        with pytest.raises(ValidationError):
            ApiV1Event.model_validate(ark(user_id=...))

    def test_answer_matches_response_model(self) -> None:
        result = ingest_v1(v1(ev(event_id="a"), ev(event_name="!"), ev(event_id="a")), NOW, S)
        result.acknowledge()
        assert IngestResponse.model_validate(result.body()).model_dump() == result.body()

    def test_openapi_schemas_generate(self) -> None:
        for model in (
            V1EventsRequest,
            ApiV1Event,
            ApiV1EventBatch,
            TrackRequest,
            IngestResponse,
            EventRecord,
            RejectedRecord,
        ):
            assert model.model_json_schema()


# ------------------------------------------------------------------------------------------------- fuzz

_KEYS = [
    "event_name",
    "event_type",
    "occurred_at",
    "timestamp",
    "event_id",
    "properties",
    "context",
    "user_id",
    "session_id",
    "sent_at",
    "metric_name",
    "value",
    "anonymous_user_id",
    "platform",
    "events",
    "app_version",
    "install_id",
    "x",
]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, NOW, NOW + 10**9, 2**63, -(2**63), 2**64 - 1, rng.randrange(-(10**15), 10**15)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e300, float(NOW), rng.random()])
    if kind in (4, 5, 6, 7):
        return rng.choice(
            [
                "",
                " ",
                "ios",
                "a",
                "$x",
                "a b",
                iso(NOW),
                iso(NOW - 10**12),
                "2026-02-19T10:00:00",
                "x" * rng.randrange(0, 300),
                "é\u0000\ud7ff",
                str(NOW),
                "{[",
                "1e999",
            ]
        )
    if kind in (8, 9):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(_KEYS): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 7))}


def _random_event(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return _random_json(rng)
    event = {
        "event_name": "e",
        "event_type": "e",
        "occurred_at": iso(NOW),
        "user_id": "u",
        "metric_name": "m",
        "value": 1,
    }
    for key in rng.sample(_KEYS, rng.randrange(0, 5)):
        if rng.random() < 0.2:
            event.pop(key, None)
        else:
            event[key] = _random_json(rng, 1)
    return event


def _check(call: Any) -> None:
    try:
        result = call()
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.code
        return
    assert isinstance(result, IngestResult)
    assert len(result.results) == result.accepted + result.rejected
    for record in result.records:
        EventRecord.model_validate(decode_record(record.value))
    for record in result.rejected_records:
        RejectedRecord.model_validate(decode_record(record.value))
    result.acknowledge(DedupCache(100))
    IngestResponse.model_validate(orjson.loads(orjson.dumps(result.body())))


def test_fuzz_shapes_never_raise_anything_but_api_error() -> None:
    rng = random.Random(20260219)
    small = Settings(max_events_per_batch=5, max_json_depth=3, max_properties_bytes=200, max_id_length=8)
    for i in range(3000):
        settings = small if i % 3 == 0 else S
        events = [_random_event(rng) for _ in range(rng.randrange(0, 7))]
        top = _random_json(rng) if rng.random() < 0.2 else {"anonymous_user_id": "u", "events": events}
        if isinstance(top, dict) and rng.random() < 0.5:
            top.update({rng.choice(_KEYS): _random_json(rng, 1) for _ in range(rng.randrange(1, 3))})
        _check(lambda: ingest_v1(top, NOW, settings))  # noqa: B023 - called at once
        _check(lambda: ingest_apiv1_batch(events if rng.random() < 0.9 else top, NOW, settings))  # noqa: B023
        one_event = _random_event(rng)
        _check(lambda: ingest_apiv1_one(one_event, NOW, settings))  # noqa: B023
        _check(lambda: ingest_track(one_event, rng.choice(["t", "", 5, "x" * 200]), NOW, settings))  # noqa: B023


def test_fuzz_bytes_never_raise_anything_but_api_error() -> None:
    rng = random.Random(7)
    seeds = [orjson.dumps(v1(*GOOD_V1)), orjson.dumps([ark(), ark()]), b'{"a":[1,2,{"b":null}]}']
    for _ in range(3000):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            op = rng.randrange(3)
            pos = rng.randrange(len(body) + 1)
            if op == 0:
                body[pos:pos] = bytes([rng.randrange(256)])
            elif op == 1 and body:
                del body[pos : pos + rng.randrange(1, 4)]
            else:
                body[pos:pos] = rng.choice([b"NaN", b"{", b"]", b'"', b"\\", b"1e999", b"\xff", b"\x00"])
        coding = rng.choice([None, "gzip", "deflate", "gzip-broken"])
        raw = bytes(body)
        if coding == "gzip":
            raw = gzip.compress(raw)
        elif coding == "deflate":
            raw = zlib.compress(raw)
        elif coding == "gzip-broken":
            raw, coding = gzip.compress(raw)[: rng.randrange(1, 40)], "gzip"
        try:
            payload = decode_body(rng.choice(["application/json", "text/plain", "text/html"]), coding, raw, S)
        except ApiError as exc:
            assert exc.status in (400, 413, 415)
            continue
        _check(lambda: ingest_v1(payload, NOW, S))  # noqa: B023
        _check(lambda: ingest_apiv1_batch(payload, NOW, S))  # noqa: B023


def test_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from abstream.bench.validation import main

    assert main(["--requests", "3", "--events", "5", "--repeat", "1", "--compare"]) == 0
    assert "events/s" in capsys.readouterr().out


def test_refused_request_dead_letter_only_for_what_the_client_sent_wrong() -> None:
    envelope = {"anonymous_user_id": "u-1", "platform": "web", "events": []}
    err = ApiError(400, "invalid_platform", "platform: bad", [{"field": "platform", "code": "x", "message": "m"}])
    err.sent = envelope
    record = refused_request("v1", NOW, err, S)
    assert record is not None and record.key == b"u-1"
    value = RejectedRecord.model_validate(decode_record(record.value))
    assert (value.scope, value.index, value.field, value.user_id) == ("request", 0, "platform", "u-1")
    assert orjson.loads(value.raw) == envelope and not value.raw_truncated
    body = b'{"user_id": "' + b"x" * 5000
    err = ApiError(400, "malformed_json", "body is not valid JSON", sent=body)
    record = refused_request("apiv1", NOW, err, S)
    assert record is not None and record.key is None
    value = RejectedRecord.model_validate(decode_record(record.value))
    assert (value.field, value.raw, value.raw_truncated) == ("body", body[:REJECTED_RAW_MAX_BYTES].decode(), True)
    record = refused_request("v1", NOW, ApiError(413, "payload_too_large", "big"), S)  # body never read
    assert record is not None and orjson.loads(record.value)["raw"] == ""
    record = refused_request("apiv1", NOW, ApiError(400, "invalid_events", "empty", sent=[]), S)
    assert record is not None and orjson.loads(record.value)["raw"] == "[]"
    for skipped in (
        ApiError(404, "test_not_found", "no test"),
        ApiError(503, "kafka_unavailable", "down"),
        ApiError(400, "incomplete_body", "client left"),
        ApiError(400, "invalid_event_type", "one event", dead_lettered=True),  # already its event's dead letter
    ):
        assert refused_request("apiv1", NOW, skipped, S) is None


def test_a_client_that_leaves_mid_body_is_a_400_not_a_500() -> None:
    import asyncio

    from starlette.requests import Request

    from gateway.plumbing import read_json

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"application/json"), (b"content-length", b"50")]
    request = Request({"type": "http", "method": "POST", "path": "/v1/events", "headers": headers}, receive)
    with pytest.raises(ApiError) as exc:
        asyncio.run(read_json(request, S))
    assert (exc.value.status, exc.value.code) == (400, "incomplete_body")
    assert refused_request("v1", NOW, exc.value, S) is None  # nobody sent anything wrong: no dead letter


def test_dead_letters_of_refused_requests_are_bounded_while_kafka_hangs() -> None:
    import asyncio

    from gateway import service as gateway_core

    class HangingPublisher:
        async def publish(self, messages: object) -> None:
            await asyncio.Event().wait()  # Kafka never answers

    async def flood() -> tuple[int, int]:
        core = gateway_core.GatewayCore(S, HangingPublisher(), None)  # type: ignore[arg-type]
        for _ in range(gateway_core.MAX_PENDING_DEAD_LETTERS + 25):
            core.record_refusal("v1", ApiError(400, "malformed_json", "bad", sent=b"{"))
        pending = len(core._dead_letters)
        for task in list(core._dead_letters):
            task.cancel()
        await asyncio.gather(*core._dead_letters, return_exceptions=True)
        return pending, core.dead_letters_dropped

    assert asyncio.run(flood()) == (gateway_core.MAX_PENDING_DEAD_LETTERS, 25)
