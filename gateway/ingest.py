"""The one validation core of event ingestion ("where an event is validated"), for both client surfaces.

Pure functions, no I/O: the routes read the body, call :func:`gateway.body.decode_body` then one ``ingest_*``
function, publish :attr:`IngestResult.records` to Kafka, and answer :meth:`IngestResult.body` only after Kafka
has acknowledged. The flow a route follows (the dedup cache is remembered only after the acks, so a request
answered 503 does not make its retry look like a duplicate)::

    payload = decode_body(headers.get("content-type"), headers.get("content-encoding"), body, settings)
    result = ingest_v1(payload, received_at_ms, settings, dedup=cache)   # ApiError -> its status and body()
    futures = [await producer.send(topic("events"), r.value, key=r.key) for r in result.records]
    for r in result.rejected_records:                                     # dead letters: log a failure,
        await producer.send(topic("events.rejected"), r.value, key=r.key) # do not fail the request for it
    await asyncio.gather(*futures)          # any failure or timeout -> 503 and NO acknowledge()
    result.acknowledge(cache)               # remembers the published client event ids
    if (error := result.single_error()):    # /apiv1/events and /track only: a rejected event is a 400
        raise error
    return Response(orjson.dumps(result.body()), media_type="application/json")

This module walks a request: the envelope, each event through the rules, deduplication, and the result. The
rest of the core has one job per module:

- ``gateway.body``: bytes -> JSON (media type, decompression limits, numbers beyond 64 bits, depth);
- ``gateway.rules``: the per-event rules (names, ids, timestamps, skew, properties/context) and envelope errors;
- ``gateway.dedup``: :class:`~gateway.dedup.DedupCache`, the client event ids recently published;
- ``gateway.records``: the Kafka records (EventRecord per user, server event ids, dead letters).

Why hand-tuned instead of running the pydantic models of ``schemas/events.py`` per event (measured with
``python -m abstream.bench.validation --compare`` on the 2-core reference box, Python 3.11, pydantic 2.14,
orjson 3.13, 50-event batches of ~330-byte events, one process, best of 10):

=====================================================================  ===========  ==========
decode + validate + stamp + encode records                             events/s     µs/event
=====================================================================  ===========  ==========
this core (hand-tuned; orjson.loads alone is 0.73 µs of it)            ~310,000     ~3.2
same work with ``V1Event.model_validate`` per event                    ~155,000     ~6.4
``V1EventsRequest.model_validate_json``: validation only, one call,    ~213,000     ~4.7
all-or-nothing, no stamping/encoding (pydantic's best case)
route work (+ dedup cache, acknowledge, answer serialised), identity   ~278,000     ~3.6
the same, gzip-compressed bodies (5.4x)                                ~236,000     ~4.2
ArkForge batch, 5 users per request                                    ~255,000     ~3.9
=====================================================================  ===========  ==========

Pydantic alone would eat the per-event budget (~3 µs for validation + stamping + encoding, so that the
gateway sustains ~140,000 events/s on two cores with HTTP and Kafka on top): its Python-level checks
(timestamp rules, size/depth) run as callbacks, and partial acceptance needs one call per event. With only
its native constraints (no size/depth/timestamp rules) a whole-batch ``model_validate_json`` still costs
~1.8 µs/event before any stamping or encoding. So the models are the documented contract (OpenAPI) and
share the rule functions with ``gateway.rules`` (``timestamp_ms``, ``is_valid_name``, ``json_too_deep``), and
``tests/test_ingest_validation.py`` checks that both agree on good and bad events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from abstream.config import Settings
from gateway.body import refuse_duplicate_keys
from gateway.dedup import NO_IDS, DedupCache
from gateway.records import PublishRecord, ServerIds, dead_letter, encode_user, new_record_event
from gateway.rules import (
    EMPTY_OBJECT,
    EPOCH,
    Limits,
    Reject,
    check_count,
    checked_name,
    clock_skew,
    corrected_time,
    envelope,
    event_time,
    id_message,
    is_id,
    json_object,
    limits,
    optional_id,
)
from schemas.errors import ApiError
from schemas.events import (
    JSON_INT_MAX,
    JSON_INT_MIN,
    KNOWN_NAMES,
    METRIC_VALUE_MAX,
    METRIC_VALUE_MESSAGE,
    PLATFORMS,
    TIMESTAMP_MAX_CHARS,
    NumberLiteral,
    unrepresentable_number,
)

__all__ = ["IngestResult", "ingest_apiv1_batch", "ingest_apiv1_one", "ingest_track", "ingest_v1"]

_dumps = orjson.dumps
_fromisoformat = datetime.fromisoformat
_Fragment = orjson.Fragment


@dataclass(slots=True)
class IngestResult:
    """What one request produced: records to publish, dead letters, and the per-event answer."""

    surface: str
    received_at_ms: int
    records: list[PublishRecord]
    """Accepted, not-duplicate events for the ``events`` topic: one record per user (first-seen order)."""
    rejected_records: list[PublishRecord]
    """One :class:`schemas.events.RejectedRecord` per rejected event, for ``events.rejected``."""
    entries: list[str | dict[str, Any]]
    """One per event, in request order: the event_id of an accepted, not-duplicate event (a plain string,
    made into its result object only when the answer is serialised: in-flight requests then hold no
    per-event containers for the garbage collector to traverse), else the result object itself."""
    accepted: int
    rejected: int
    duplicates: int
    acknowledged: bool = field(default=False)

    @property
    def results(self) -> list[dict[str, Any]]:
        """One per event, in request order (``AcceptedResult`` / ``RejectedResult`` shapes)."""
        return [
            {"index": i, "status": "accepted", "event_id": e, "duplicate": False} if type(e) is str else e
            for i, e in enumerate(self.entries)
        ]

    def acknowledge(self, dedup: DedupCache | None = None) -> None:
        """Call once Kafka acknowledged every record: remembers their client event ids, unlocks :meth:`body`."""
        if dedup is not None:
            for record in self.records:
                if record.client_event_ids:
                    dedup.remember(record.user_id, record.client_event_ids)  # type: ignore[arg-type]
        self.acknowledged = True

    def body(self) -> dict[str, Any]:
        """The 200 answer (``IngestResponse``). Refuses before :meth:`acknowledge`: never 2xx before the ack."""
        if self.records and not self.acknowledged:
            raise RuntimeError("IngestResult.body() before acknowledge(): publish to Kafka first")
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "results": self.results,
        }

    def single_error(self) -> ApiError | None:
        """For single-event endpoints (/apiv1/events, /track): the 400 to answer if that event was rejected."""
        if len(self.entries) != 1 or type(self.entries[0]) is str or self.entries[0]["status"] != "rejected":
            return None
        r = self.entries[0]
        detail = {"field": r["field"], "code": r["code"], "message": r["message"]}
        return ApiError(400, r["code"], f"{r['field']}: {r['message']}", [detail], dead_lettered=True)


class _Batch:
    """Accumulates one request's verdicts: groups accepted events per user and applies deduplication."""

    __slots__ = (
        "surface",
        "received_at_ms",
        "dedup",
        "ids",
        "groups",
        "entries",
        "rejected_records",
        "request_keys",
        "accepted",
        "duplicates",
    )

    def __init__(self, surface: str, received_at_ms: int, dedup: DedupCache | None) -> None:
        self.surface = surface
        self.received_at_ms = received_at_ms
        self.dedup = dedup
        self.ids: ServerIds | None = None
        self.groups: dict[str, tuple[list[dict[str, Any]], list[str], list[str | None]]] = {}
        """Per user: the record events, their event ids, and each one's client-given id (None: server id)."""
        self.entries: list[str | dict[str, Any]] = []
        self.rejected_records: list[PublishRecord] = []
        self.request_keys: set[tuple[str, str]] = set()
        """(user id, client event id) of the events accepted so far: a repeat within the request is a duplicate."""
        self.accepted = 0
        self.duplicates = 0

    def accept(self, index: int, user_id: str, event: dict[str, Any], event_id: str | None) -> None:
        """``event`` is the record event with event_id/event_id_source still unset."""
        client_id = None
        if event_id is None:
            ids = self.ids
            if ids is None:
                ids = self.ids = ServerIds(self.received_at_ms)
            event_id = ids.next()
            event["event_id_source"] = "server"
        else:
            key = (user_id, event_id)
            if key in self.request_keys or (self.dedup is not None and self.dedup.seen(user_id, event_id)):
                self.entries.append({"index": index, "status": "accepted", "event_id": event_id, "duplicate": True})
                self.accepted += 1
                self.duplicates += 1
                return
            self.request_keys.add(key)
            client_id = event_id
            event["event_id_source"] = "client"
        event["event_id"] = event_id
        group = self.groups.get(user_id)
        if group is None:
            group = self.groups[user_id] = ([], [], [])
        group[0].append(event)
        group[1].append(event_id)
        group[2].append(client_id)
        self.entries.append(event_id)
        self.accepted += 1

    def reject(self, index: int, exc: Reject, prefix: str, event: object, user_id: str | None) -> None:
        path = f"{prefix}.{exc.field}" if prefix and exc.field else (prefix or exc.field or "body")
        self.entries.append(
            {"index": index, "status": "rejected", "code": exc.code, "field": path, "message": exc.message}
        )
        self.rejected_records.append(
            dead_letter(self.surface, self.received_at_ms, "event", index, exc.code, path, exc.message, user_id, event)
        )

    def finish(self) -> IngestResult:
        records: list[PublishRecord] = []
        for user_id, (events, event_ids, client_ids) in self.groups.items():
            encode_user(records, self.surface, user_id, self.received_at_ms, events, event_ids, client_ids)
        return IngestResult(
            surface=self.surface,
            received_at_ms=self.received_at_ms,
            records=records,
            rejected_records=self.rejected_records,
            entries=self.entries,
            accepted=self.accepted,
            rejected=len(self.rejected_records),
            duplicates=self.duplicates,
        )


def ingest_v1(payload: Any, received_at_ms: int, settings: Settings, dedup: DedupCache | None = None) -> IngestResult:
    """Calicritters ``POST /v1/events``: envelope errors raise ApiError, event problems become rejections."""
    lim = limits(settings)
    if type(payload) is not dict:
        raise envelope("invalid_body", "body", "must be a JSON object with anonymous_user_id and events")
    user_id = payload.get("anonymous_user_id")
    if not is_id(user_id, lim.id_len):
        code = "missing_anonymous_user_id" if user_id is None else "invalid_anonymous_user_id"
        raise envelope(code, "anonymous_user_id", id_message(lim.id_len))
    ctx = {}
    for key in ("session_id", "app_version", "install_id"):
        value = payload.get(key)
        if value is not None and not is_id(value, lim.id_len):
            raise envelope(f"invalid_{key}", key, id_message(lim.id_len))
        ctx[key] = value
    platform = payload.get("platform")
    if platform is not None and platform not in PLATFORMS:
        raise envelope("invalid_platform", "platform", "must be one of: ios, android")
    sent_at = payload.get("sent_at")
    skew = None
    if sent_at is not None:
        try:
            skew = clock_skew(sent_at, lim, received_at_ms)
        except Reject as exc:
            raise envelope(exc.code, "sent_at", exc.message) from None
    events = payload.get("events")
    if type(events) is not list or not events:
        what = "is required" if events is None else "must be a non-empty JSON array of events"
        raise envelope("invalid_events", "events", what)
    check_count(len(events), lim, "events")
    kept = len(payload)  # keys of the objects walked here, for refuse_duplicate_keys

    session_id, app_version, install_id = ctx["session_id"], ctx["app_version"], ctx["install_id"]
    batch = _Batch("v1", received_at_ms, dedup)
    # The loop below is _Batch.accept, checked_name, event_time and json_object inlined for their common case
    # (each falls back to the full function, which also produces the rejection): ~1 µs/event saved.
    known_names = KNOWN_NAMES
    fromiso = _fromisoformat
    epoch = EPOCH
    dumps = _dumps
    fragment = _Fragment
    empty = EMPTY_OBJECT
    future_ms, age_ms, obj_bytes, depth, id_len = lim.future_ms, lim.age_ms, lim.obj_bytes, lim.depth, lim.id_len
    # DedupCache.seen() inlined: the request's one user is looked up once, its ids per event.
    young, old = dedup.ids_of(user_id) if dedup is not None else (NO_IDS, NO_IDS)
    request_ids: set[str] = set()  # _Batch.request_keys for the request's one user
    entries = batch.entries
    out_events: list[dict[str, Any]] = []
    out_ids: list[str] = []
    out_client_ids: list[str | None] = []
    template = new_record_event(
        "event",
        sent_at=sent_at,
        skew_ms=skew,
        session_id=session_id,
        platform=platform,
        app_version=app_version,
        install_id=install_id,
    )
    for index, ev in enumerate(events):
        try:
            if type(ev) is not dict:
                raise Reject("invalid_event", "", "must be a JSON object")
            kept += len(ev)
            name = ev.get("event_name")
            if type(name) is not str or name not in known_names:
                name = checked_name(ev, "event_name")
            occurred_at = ev.get("occurred_at")
            occurred_ms = None
            if type(occurred_at) is str and len(occurred_at) <= TIMESTAMP_MAX_CHARS:
                try:
                    dt = fromiso(occurred_at)
                except ValueError:
                    dt = None
                if dt is not None and dt.tzinfo is not None:
                    td = dt - epoch
                    occurred_ms = td.days * 86_400_000 + td.seconds * 1000 + td.microseconds // 1000
                    ahead = occurred_ms - received_at_ms
                    if ahead > future_ms or -ahead > age_ms:
                        occurred_ms = None
            if occurred_ms is None:
                if occurred_at is None:
                    raise Reject("missing_occurred_at", "occurred_at", "is required")
                occurred_ms = event_time(occurred_at, "occurred_at", lim, received_at_ms)
            if skew is not None:
                corrected_ms = occurred_ms + skew
                if not -age_ms <= corrected_ms - received_at_ms <= future_ms:
                    corrected_time(occurred_ms, skew, "occurred_at", lim, received_at_ms)
            event_id = ev.get("event_id")
            if event_id is not None and (
                type(event_id) is not str or not 0 < len(event_id) <= id_len or event_id.isspace() or "\x00" in event_id
            ):
                raise Reject("invalid_event_id", "event_id", id_message(id_len))
            value = ev.get("properties")
            properties = None
            if type(value) is dict and value:
                kept += len(value)
                try:
                    raw = dumps(value)
                    if len(raw) <= obj_bytes and (
                        raw.rfind(123) == 0 and 91 not in raw or raw.count(123) + raw.count(91) <= depth
                    ):
                        properties = fragment(raw)
                except orjson.JSONEncodeError:
                    pass
            if properties is None:
                properties = json_object(value, "properties", lim)
            value = ev.get("context")
            context = None
            if type(value) is dict and value:
                kept += len(value)
                try:
                    raw = dumps(value)
                    if len(raw) <= obj_bytes and (
                        raw.rfind(123) == 0 and 91 not in raw or raw.count(123) + raw.count(91) <= depth
                    ):
                        context = fragment(raw)
                except orjson.JSONEncodeError:
                    pass
            elif value is None:
                context = empty
            if context is None:
                context = json_object(value, "context", lim)
        except Reject as exc:
            batch.reject(index, exc, f"events.{index}", ev, user_id)
            continue
        if event_id is None:
            ids = batch.ids
            if ids is None:
                ids = batch.ids = ServerIds(received_at_ms)
            event_id = ids.next()
            source = "server"
            client_id = None
        else:
            if event_id in request_ids or event_id in young or event_id in old:
                entries.append({"index": index, "status": "accepted", "event_id": event_id, "duplicate": True})
                batch.duplicates += 1
                continue
            request_ids.add(event_id)
            source = "client"
            client_id = event_id
        record_event = template.copy()  # ~2x faster than an 18-key literal; key order stays the template's
        record_event["event_id"] = event_id
        record_event["event_id_source"] = source
        record_event["event_name"] = name
        record_event["occurred_at"] = occurred_at
        record_event["occurred_at_ms"] = occurred_ms
        if skew is not None:
            record_event["corrected_at_ms"] = corrected_ms
        record_event["properties"] = properties
        record_event["context"] = context
        out_events.append(record_event)
        out_ids.append(event_id)
        out_client_ids.append(client_id)
        entries.append(event_id)  # the result object is built when the answer is serialised
    refuse_duplicate_keys(payload, kept)
    batch.accepted = len(entries) - len(batch.rejected_records)
    if out_events:
        batch.groups[user_id] = (out_events, out_ids, out_client_ids)
    return batch.finish()


def _apiv1_event(ev: object, lim: Limits, received_at_ms: int) -> tuple[str, str | None, dict[str, Any]]:
    """One ArkForge event -> (user_id, client event_id, record event); raises Reject."""
    if type(ev) is not dict:
        raise Reject("invalid_event", "", "must be a JSON object")
    name = checked_name(ev, "event_type")
    user_id = ev.get("user_id")
    if not is_id(user_id, lim.id_len):
        code = "missing_user_id" if user_id is None else "invalid_user_id"
        raise Reject(code, "user_id", id_message(lim.id_len))
    session_id = optional_id(ev, "session_id", lim)
    occurred_at, key = ev.get("occurred_at"), "occurred_at"
    if occurred_at is None:
        occurred_at, key = ev.get("timestamp"), "timestamp"
    occurred_ms = received_at_ms if occurred_at is None else event_time(occurred_at, key, lim, received_at_ms)
    sent_at = ev.get("sent_at")
    skew = None if sent_at is None else clock_skew(sent_at, lim, received_at_ms)
    corrected_ms = None
    if skew is not None and occurred_at is not None:
        corrected_ms = corrected_time(occurred_ms, skew, key, lim, received_at_ms)
    event_id = optional_id(ev, "event_id", lim)
    properties = json_object(ev.get("properties"), "properties", lim)
    event = _APIV1_TEMPLATE.copy()
    event["event_name"] = name
    event["occurred_at"] = occurred_at
    event["occurred_at_ms"] = occurred_ms
    event["sent_at"] = sent_at
    event["skew_ms"] = skew
    event["corrected_at_ms"] = corrected_ms
    event["session_id"] = session_id
    event["properties"] = properties
    return user_id, event_id, event  # type: ignore[return-value]


_APIV1_TEMPLATE = new_record_event("event")


def _user_of(ev: object, lim: Limits) -> str | None:
    user_id = ev.get("user_id") if type(ev) is dict else None
    return user_id if is_id(user_id, lim.id_len) else None  # type: ignore[return-value]


def _apiv1(
    payload: Any,
    events: list[Any],
    prefix: str | None,
    received_at_ms: int,
    settings: Settings,
    dedup: DedupCache | None,
) -> IngestResult:
    lim = limits(settings)
    batch = _Batch("apiv1", received_at_ms, dedup)
    kept = 0  # keys of the objects walked here, for refuse_duplicate_keys
    for index, ev in enumerate(events):
        if type(ev) is dict:
            kept += len(ev)
            properties = ev.get("properties")
            if type(properties) is dict:
                kept += len(properties)
        try:
            user_id, event_id, event = _apiv1_event(ev, lim, received_at_ms)
        except Reject as exc:
            batch.reject(index, exc, f"{prefix}{index}" if prefix is not None else "", ev, _user_of(ev, lim))
            continue
        batch.accept(index, user_id, event, event_id)
    refuse_duplicate_keys(payload, kept)
    return batch.finish()


def ingest_apiv1_one(
    payload: Any, received_at_ms: int, settings: Settings, dedup: DedupCache | None = None
) -> IngestResult:
    """ArkForge ``POST /apiv1/events`` (one object). A rejected event: see :meth:`IngestResult.single_error`.

    Without occurred_at (or its alias ``timestamp``) the event happened when it was received.
    """
    if type(payload) is not dict:
        raise envelope("invalid_body", "body", "must be a JSON object (one event); use /apiv1/events/batch for arrays")
    return _apiv1(payload, [payload], None, received_at_ms, settings, dedup)


def ingest_apiv1_batch(
    payload: Any, received_at_ms: int, settings: Settings, dedup: DedupCache | None = None
) -> IngestResult:
    """ArkForge ``POST /apiv1/events/batch`` (a JSON array): one record per user, per-event results."""
    if type(payload) is not list:
        raise envelope("invalid_body", "body", "must be a JSON array of events")
    if not payload:
        raise envelope("invalid_events", "body", "must contain at least one event")
    check_count(len(payload), limits(settings), "body")
    return _apiv1(payload, payload, "", received_at_ms, settings, dedup)


def ingest_track(
    payload: Any, experiment_id: str, received_at_ms: int, settings: Settings, dedup: DedupCache | None = None
) -> IngestResult:
    """ArkForge ``POST /apiv1/ab-tests/{test_id}/track``: one metric event (kind="metric") for the workers.

    ``experiment_id`` is the URL's test_id (format checked here; whether it exists is the registry's call).
    The record's event_name is the metric_name, so event-level rollups see metrics too. A rejected metric
    is answered with :meth:`IngestResult.single_error` (e.g. 400 ``non_finite_value``).
    """
    lim = limits(settings)
    if not is_id(experiment_id, lim.id_len):
        raise envelope("invalid_test_id", "test_id", id_message(lim.id_len))
    if type(payload) is not dict:
        raise envelope("invalid_body", "body", "must be a JSON object with user_id, metric_name and value")
    refuse_duplicate_keys(payload)
    batch = _Batch("track", received_at_ms, dedup)
    try:
        user_id = payload.get("user_id")
        if not is_id(user_id, lim.id_len):
            code = "missing_user_id" if user_id is None else "invalid_user_id"
            raise Reject(code, "user_id", id_message(lim.id_len))
        name = checked_name(payload, "metric_name")
        value = payload.get("value")
        t = type(value)
        if value is None:
            raise Reject("missing_value", "value", "is required")
        if t is float:
            if not math.isfinite(value):
                raise Reject("non_finite_value", "value", "must be a finite number (not NaN or Infinity)")
        elif t is NumberLiteral or (t is int and not JSON_INT_MIN <= value <= JSON_INT_MAX):
            _, code, message = unrepresentable_number(value)  # type: ignore[misc]
            raise Reject(code, "value", message)
        elif t is not int:
            raise Reject("invalid_value", "value", "must be a number")
        if abs(value) > METRIC_VALUE_MAX:  # a finite float or a 64-bit integer by now
            raise Reject("value_out_of_range", "value", METRIC_VALUE_MESSAGE)
        occurred_at, key = payload.get("occurred_at"), "occurred_at"
        if occurred_at is None:
            occurred_at, key = payload.get("timestamp"), "timestamp"
        occurred_ms = received_at_ms if occurred_at is None else event_time(occurred_at, key, lim, received_at_ms)
        event_id = optional_id(payload, "event_id", lim)
        session_id = optional_id(payload, "session_id", lim)
        properties = json_object(payload.get("properties"), "properties", lim)
    except Reject as exc:
        batch.reject(0, exc, "", payload, _user_of(payload, lim))
        return batch.finish()
    event = new_record_event(
        "metric",
        event_name=name,
        occurred_at=occurred_at,
        occurred_at_ms=occurred_ms,
        session_id=session_id,
        experiment_id=experiment_id,
        metric_name=name,
        value=value,
        properties=properties,
    )
    batch.accept(0, user_id, event, event_id)  # type: ignore[arg-type]
    return batch.finish()
