"""The one definition of every event payload: the two client surfaces, the answer, the Kafka records.

Client surfaces (request bodies; the gateway's OpenAPI is generated from these models):

* Calicritters ``POST /v1/events`` -> :class:`V1EventsRequest` (top-level client context plus ``events[]``).
* ArkForge ``POST /apiv1/events`` -> :class:`ApiV1Event`; ``POST /apiv1/events/batch`` -> :class:`ApiV1EventBatch`
  (a JSON array of those).
* ArkForge ``POST /apiv1/ab-tests/{test_id}/track`` -> :class:`TrackRequest`.
* Answer of every ingestion endpoint -> :class:`IngestResponse` (per-event results; one bad event never
  rejects its neighbours).

Kafka records (shared with ``stream_workers``):

* ``events`` topic -> :class:`EventRecord`, key = user id (UTF-8). ONE record carries the accepted events of
  ONE user from one request, because a Faust worker's cost is per record, not per event.
* ``events.rejected`` topic -> :class:`RejectedRecord` (dead letters, one per rejected event, with the reason).

The hot path (``gateway/ingest.py``) does not run these pydantic models per event: measured on this box that
is about twice as slow as the hand-tuned checks (figures in ``gateway/ingest.py``'s docstring). Both enforce
the same rules because both call the rule functions defined here (:func:`timestamp_ms`, :func:`is_valid_name`,
:func:`json_too_deep`), and ``tests/test_ingest_validation.py`` cross-checks them on good and bad events.
Limits that are settings (id length, properties size/depth, batch size, time window) are documented here
with their defaults; the effective numbers live in ``abstream/config.py``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, StrictFloat, StrictInt, StrictStr

# --------------------------------------------------------------------------------------------- rules

RECORD_VERSION = 1
"""``v`` of :class:`EventRecord` and :class:`RejectedRecord`. Bump on any incompatible change."""

NAME_MAX_LENGTH = 128
NAME_PATTERN = r"^[A-Za-z$][A-Za-z0-9_.:$-]{0,127}$"
"""event_name / event_type / metric_name: ASCII letter or ``$`` first (PostHog-style ``$pageview``), then
letters, digits and ``_ . : $ -``; 1..128 characters. No spaces: names are grouped, filtered and typed
into SQL by analysts, so one spelling per event is worth the strictness."""

_NAME_RE = re.compile(NAME_PATTERN[1:-1])  # used with fullmatch: "$" alone would also match before a "\n"

DEFAULT_MAX_ID_LENGTH = 128  # Settings.max_id_length
DEFAULT_MAX_PROPERTIES_BYTES = 16_384  # Settings.max_properties_bytes
DEFAULT_MAX_JSON_DEPTH = 8  # Settings.max_json_depth
DEFAULT_MAX_EVENTS_PER_BATCH = 1000  # Settings.max_events_per_batch

TIMESTAMP_MAX_CHARS = 64
"""Longest ISO 8601 string looked at; longer is ``invalid_*`` without parsing."""
EPOCH_MS_MAX = 253_402_300_799_999
"""Integer timestamps are epoch milliseconds in [0, EPOCH_MS_MAX] (1970-01-01 .. 9999-12-31)."""

REJECTED_RAW_MAX_BYTES = 2048
""":class:`RejectedRecord` keeps the offending event's JSON up to this many bytes (``raw_truncated`` says so)."""

MAX_RECORD_BYTES = 900_000
"""An :class:`EventRecord` is split (same key, several records) before it would exceed this size: Kafka's
default ``max.message.bytes`` and aiokafka's ``max_request_size`` are 1 MiB."""

PLATFORMS = ("ios", "android")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_fromisoformat = datetime.fromisoformat


class TimestampError(ValueError):
    """A timestamp the client sent cannot be used; ``reason`` is ``"invalid"`` or ``"naive"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def timestamp_ms(value: object) -> int:
    """Epoch milliseconds (UTC, floored) of a client timestamp, or raise :class:`TimestampError`.

    Accepted: an ISO 8601 string WITH a zone (``Z`` or ``±HH:MM``), anything ``datetime.fromisoformat``
    reads (3.11: ``2026-02-19T10:15:30.123Z``, ``2026-02-19 10:15:30+01:00``, basic and week forms;
    fractions beyond microseconds are truncated), or an integer of epoch MILLISECONDS. Rejected: naive
    strings (``reason="naive"``: a zone-less time is ambiguous by up to 26 h), floats, booleans and
    strings of digits (seconds or milliseconds? we refuse to guess).
    """
    t = type(value)
    if t is str:
        if len(value) > TIMESTAMP_MAX_CHARS:  # type: ignore[arg-type]
            raise TimestampError("invalid", f"longer than {TIMESTAMP_MAX_CHARS} characters")
        try:
            dt = _fromisoformat(value)  # type: ignore[arg-type]
        except ValueError:
            dt = None
        if dt is None and ("t" in value or "z" in value):  # type: ignore[operator]
            try:  # RFC 3339 allows a lower-case T and Z; fromisoformat does not
                dt = _fromisoformat(value.upper())  # type: ignore[attr-defined]
            except ValueError:
                dt = None
        if dt is None:
            raise TimestampError(
                "invalid", "not an ISO 8601 date-time (e.g. 2026-02-19T10:15:30.123Z) nor epoch milliseconds"
            )
        if dt.tzinfo is None:
            raise TimestampError("naive", "has no time zone: add Z or an offset such as +01:00")
        td = dt - _EPOCH
        return td.days * 86_400_000 + td.seconds * 1000 + td.microseconds // 1000
    if t is int:
        if 0 <= value <= EPOCH_MS_MAX:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        raise TimestampError("invalid", f"epoch milliseconds must lie in [0, {EPOCH_MS_MAX}]")
    if t is float:
        raise TimestampError("invalid", "epoch milliseconds must be an integer")
    raise TimestampError("invalid", "must be an ISO 8601 string with a time zone or integer epoch milliseconds")


KNOWN_NAMES: set[str] = set()
"""Names already validated (a cache, bounded to 8192: names repeat, so most checks are one set lookup)."""


def is_valid_name(value: object) -> bool:
    """True for a string matching :data:`NAME_PATTERN`. Valid names are cached: they repeat a lot."""
    if type(value) is not str:
        return False
    if value in KNOWN_NAMES:
        return True
    if _NAME_RE.fullmatch(value) is None:
        return False
    if len(KNOWN_NAMES) >= 8192:  # bounded: a client inventing names cannot grow it
        KNOWN_NAMES.clear()
    KNOWN_NAMES.add(value)
    return True


def json_too_deep(value: dict[str, Any] | list[Any], max_depth: int) -> bool:
    """True when ``value`` nests deeper than ``max_depth`` (the object itself is depth 1)."""
    if max_depth <= 0:
        return True
    for child in value.values() if type(value) is dict else value:
        t = type(child)
        if (t is dict or t is list) and json_too_deep(child, max_depth - 1):
            return True
    return False


JSON_INT_MIN, JSON_INT_MAX = -(2**63), 2**64 - 1
"""Integers a JSON value may hold: what orjson reads exactly and ClickHouse's JSON functions return (Int64,
UInt64). Beyond, a reader silently rounds to a float, so such numbers are refused: send them as strings."""

INTEGER_RANGE_MESSAGE = (
    f"is an integer outside [{JSON_INT_MIN}, {JSON_INT_MAX}]; JSON readers and ClickHouse would round it "
    "to a float, so send it as a string"
)


FLOAT_RANGE_MESSAGE = "is beyond the range of a 64-bit float (about 1.8e308)"

METRIC_VALUE_MAX = 2**53
"""Largest |value| of a tracked metric, integer or not: 2^53 = 9,007,199,254,740,992, up to which a double holds
every integer exactly. The rollups keep each user's daily sum and its square as Float64; with values this size, a
user would need ~1e138 observations in a day before a square overflowed to infinity (which the warehouse stores as
0). A cap of 1e150 per value did not hold per user: ~13,400 values of 1e150 in a day overflowed."""
METRIC_VALUE_MESSAGE = (
    f"must be at most 2^53 ({METRIC_VALUE_MAX}) in absolute value: the rollups keep sums of squares as Float64"
)


class NumberLiteral:
    """A JSON number no 64-bit reader keeps as written, held as the client wrote it: an integer outside
    [JSON_INT_MIN, JSON_INT_MAX] (orjson turns ``12345678901234567890123`` into ``1.2345678901234568e22`` without
    a word) or a number beyond the double range (``1e999``: orjson refuses the whole body).

    The gateway re-reads a body that may hold one and puts one of these in the number's place, so that only the
    event holding it is refused (``integer_out_of_range`` / ``non_finite_value``), and its dead letter still
    shows the digits as sent.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def is_integer(self) -> bool:
        return not any(c in self.text for c in ".eE")

    @property
    def code(self) -> str:
        return "integer_out_of_range" if self.is_integer else "non_finite_value"

    @property
    def message(self) -> str:
        return INTEGER_RANGE_MESSAGE if self.is_integer else FLOAT_RANGE_MESSAGE

    def __repr__(self) -> str:
        return f"NumberLiteral({self.text!r})"


def unrepresentable_number(value: object) -> tuple[str, str, str] | None:
    """(path, code, message) of the first number in a JSON value that cannot be kept as written (a
    :class:`NumberLiteral`, or a Python int outside [JSON_INT_MIN, JSON_INT_MAX]), or None. The path is dotted
    (``a.0.b``), ``""`` for ``value`` itself."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        t = type(item)
        if t is NumberLiteral:
            return path, item.code, item.message  # type: ignore[attr-defined]
        if t is int and not JSON_INT_MIN <= item <= JSON_INT_MAX:  # type: ignore[operator]
            return path, "integer_out_of_range", INTEGER_RANGE_MESSAGE
        if t is dict:
            children: Any = item.items()  # type: ignore[attr-defined]
        elif t is list:
            children = enumerate(item)  # type: ignore[arg-type]
        else:
            continue
        prefix = f"{path}." if path else ""
        stack.extend((f"{prefix}{key}", child) for key, child in reversed(list(children)))
    return None


def _check_timestamp(value: str | int) -> str | int:
    timestamp_ms(value)
    return value


def _check_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError(f"must match {NAME_PATTERN}")
    return value


def _check_object(value: dict[str, Any]) -> dict[str, Any]:
    if json_too_deep(value, DEFAULT_MAX_JSON_DEPTH):
        raise ValueError(f"nests deeper than {DEFAULT_MAX_JSON_DEPTH} levels (max_json_depth)")
    bad = unrepresentable_number(value)
    if bad is not None:
        raise ValueError(f"{bad[0]} {bad[2]}")
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # a TypeError: pydantic would not report it as a validation error
        raise ValueError(f"not serialisable as JSON: {exc}") from None
    if size > DEFAULT_MAX_PROPERTIES_BYTES:
        raise ValueError(f"larger than {DEFAULT_MAX_PROPERTIES_BYTES} bytes serialised (max_properties_bytes)")
    return value


def _check_id(value: str) -> str:
    if value.isspace():
        raise ValueError("must contain a non-space character")
    if "\x00" in value:  # gateway.rules.is_id: downstream C strings would end there
        raise ValueError("must not contain NUL (U+0000)")
    return value


# ------------------------------------------------------------------------------ reusable field types

Timestamp = Annotated[
    StrictStr | StrictInt,
    AfterValidator(_check_timestamp),
    Field(
        description=(
            "ISO 8601 date-time WITH a zone (`2026-02-19T10:15:30.123Z`, `...+01:00`) or integer epoch "
            "MILLISECONDS. Naive strings, floats and digit strings are rejected. Must lie no more than "
            "max_future_skew_s (300 s) after the gateway's receive time and no more than max_event_age_s "
            "(30 days) before it."
        ),
        examples=["2026-02-19T10:15:30.123Z", 1771496130123],
    ),
]
EventName = Annotated[
    StrictStr,
    # Constraints before the validator: after it, pydantic leaves them out of the JSON schema (OpenAPI).
    Field(pattern=NAME_PATTERN, min_length=1, max_length=NAME_MAX_LENGTH, examples=["session_submitted"]),
    AfterValidator(_check_name),
]
Id = Annotated[
    StrictStr,
    AfterValidator(_check_id),
    Field(min_length=1, max_length=DEFAULT_MAX_ID_LENGTH, description="Non-blank string, <= max_id_length (128)."),
]
JsonObject = Annotated[
    dict[str, Any],
    AfterValidator(_check_object),
    Field(
        description=(
            "Any JSON object, stored exactly as posted. At most max_properties_bytes (16 KiB) serialised "
            "and max_json_depth (8) levels deep (the object itself is level 1). Absent or null = {}. "
            "Integers must lie in [-2^63, 2^64-1] (else integer_out_of_range): send bigger ones as strings."
        )
    ),
]
EventId = Annotated[
    Id,
    Field(
        description=(
            "Client-chosen idempotency key (a UUID is best). A repeat of an id this gateway process has "
            "published for the same user is answered accepted with duplicate=true and not stored twice. "
            "When absent the server assigns a UUIDv7."
        )
    ),
]


class _Payload(BaseModel):
    # Unknown fields are ignored (forward compatible clients), never stored.
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- Calicritters /v1/events


class V1Event(_Payload):
    """One event of a ``POST /v1/events`` batch."""

    event_name: EventName
    occurred_at: Timestamp
    event_id: EventId | None = None
    properties: JsonObject | None = None
    context: JsonObject | None = None


class V1EventsRequest(_Payload):
    """``POST /v1/events``: client context shared by every event of the batch, then the events.

    Envelope problems (this object, the context fields, ``events`` missing/empty/too long) fail the whole
    request; a problem inside one event rejects that event only.
    """

    anonymous_user_id: Id = Field(description="Stable client-generated user id; the Kafka key.")
    session_id: Id | None = None
    platform: Literal["ios", "android"] | None = None
    app_version: Id | None = None
    install_id: Id | None = None
    sent_at: Timestamp | None = Field(
        default=None,
        description=(
            "Device clock when the batch was sent. With it the server records skew_ms = received_at - sent_at "
            "and corrected_at_ms = occurred_at + skew_ms for every event (device clock correction). The same "
            "window as occurred_at applies (400 sent_at_in_future / sent_at_too_old), and to each corrected time: "
            "an event whose occurred_at is more than 300 s after sent_at is rejected (occurred_at_after_sent_at), "
            "one older than the horizon once corrected too (occurred_at_too_old)."
        ),
    )
    events: list[V1Event] = Field(min_length=1, max_length=DEFAULT_MAX_EVENTS_PER_BATCH)


# ------------------------------------------------------------------------------ ArkForge /apiv1/...


class ApiV1Event(_Payload):
    """``POST /apiv1/events`` body, and one element of ``/apiv1/events/batch``."""

    event_type: EventName
    user_id: Id = Field(description="Required: events are keyed, partitioned and joined by user.")
    session_id: Id | None = None
    properties: JsonObject | None = None
    occurred_at: Timestamp | None = Field(default=None, description="When it happened; absent = received_at.")
    timestamp: Timestamp | None = Field(default=None, description="Alias of occurred_at, used only without it.")
    event_id: EventId | None = None
    sent_at: Timestamp | None = Field(default=None, description="Device clock at sending, as in /v1/events.")


class ApiV1EventBatch(
    RootModel[Annotated[list[ApiV1Event], Field(min_length=1, max_length=DEFAULT_MAX_EVENTS_PER_BATCH)]]
):
    """`POST /apiv1/events/batch`: a non-empty JSON array of ArkForge events (`ApiV1Event`), at most
    ABSTREAM_MAX_EVENTS_PER_BATCH of them (1000 by default)."""


class TrackRequest(_Payload):
    """``POST /apiv1/ab-tests/{test_id}/track``: one metric observation for a user in an experiment."""

    user_id: Id
    metric_name: EventName
    value: (
        Annotated[StrictInt, Field(ge=-METRIC_VALUE_MAX, le=METRIC_VALUE_MAX)]
        | Annotated[StrictFloat, Field(allow_inf_nan=False, ge=-METRIC_VALUE_MAX, le=METRIC_VALUE_MAX)]
    ) = Field(
        description="Finite number (NaN/Infinity: 400 non_finite_value; booleans are not numbers), at most 2^53 "
        f"({METRIC_VALUE_MAX}) in absolute value (400 value_out_of_range: the rollups sum squares of values)."
    )
    event_id: EventId | None = None
    occurred_at: Timestamp | None = None
    timestamp: Timestamp | None = None
    session_id: Id | None = None
    properties: JsonObject | None = None


# -------------------------------------------------------------------------------------------- answer


class AcceptedResult(BaseModel):
    index: int = Field(description="Position of the event in the request (0 for single-event endpoints).")
    status: Literal["accepted"] = "accepted"
    event_id: str = Field(description="The client's event_id, or the UUIDv7 the server assigned.")
    duplicate: bool = Field(description="True when this event_id was already published: not stored again.")


class RejectedResult(BaseModel):
    index: int
    status: Literal["rejected"] = "rejected"
    code: str = Field(description="Stable machine-readable reason, e.g. occurred_at_in_future.")
    field: str = Field(description="Dotted path of the bad field from the body root, e.g. events.3.occurred_at.")
    message: str


EventResult = Annotated[AcceptedResult | RejectedResult, Field(discriminator="status")]


class IngestResponse(BaseModel):
    """200 answer of every ingestion endpoint, sent only after Kafka acknowledged the accepted events."""

    accepted: int = Field(description="Events answered accepted, duplicates included.")
    rejected: int
    duplicates: int = Field(description="Accepted events that were repeats (already published), a subset.")
    results: list[EventResult] = Field(description="One per event, in request order.")


# ------------------------------------------------------------------------------------- Kafka records

Surface = Literal["v1", "apiv1", "track"]


class RecordEvent(BaseModel):
    """One event inside an :class:`EventRecord`: self-contained and flat, every key always present."""

    event_id: str
    event_id_source: Literal["client", "server"]
    kind: Literal["event", "metric"]
    event_name: str = Field(description="event_name (v1), event_type (apiv1) or metric_name (track).")
    occurred_at: str | int | None = Field(description="Exactly as posted; null when the client sent none.")
    occurred_at_ms: int = Field(description="Parsed occurred_at, UTC epoch ms; received_at_ms when absent.")
    sent_at: str | int | None = Field(description="Exactly as posted, or null.")
    skew_ms: int | None = Field(description="received_at_ms - sent_at (ms), or null without sent_at.")
    corrected_at_ms: int | None = Field(
        description="occurred_at_ms + skew_ms; null without sent_at, or on /apiv1 without a client occurred_at "
        "(the receive time stands in for it and needs no correction)."
    )
    session_id: str | None
    platform: str | None
    app_version: str | None
    install_id: str | None
    experiment_id: str | None = Field(description="track: the test_id of the URL; else null.")
    metric_name: str | None = Field(description="track: the metric; else null.")
    value: float | int | None = Field(description="track: the finite value; else null.")
    properties: dict[str, Any] = Field(description="Exactly as posted ({} when absent or null).")
    context: dict[str, Any] = Field(description="Exactly as posted ({} when absent or null; v1 only).")


RECORD_EVENT_KEYS: tuple[str, ...] = tuple(RecordEvent.model_fields)
"""The keys of every record event, in the order the gateway writes them."""


class EventRecord(BaseModel):
    """Value of a record on the ``events`` topic (key: ``user_id`` UTF-8). Encode with :func:`encode_record`."""

    v: Literal[1] = RECORD_VERSION
    user_id: str = Field(description="anonymous_user_id (v1) or user_id (apiv1, track).")
    surface: Surface
    received_at_ms: int = Field(description="Gateway clock when the request arrived, UTC epoch ms.")
    events: list[RecordEvent] = Field(min_length=1)


class RejectedRecord(BaseModel):
    """Value of a record on the ``events.rejected`` topic (key: user id or none): one per rejected event, or one
    per ingestion request refused as a whole (400/413/415: malformed JSON, a bad envelope field, too many events)."""

    v: Literal[1] = RECORD_VERSION
    surface: Surface
    received_at_ms: int
    scope: Literal["event", "request"] = Field(
        "event", description="event: one event of an answered request; request: the whole request was refused."
    )
    index: int = Field(description="The event's index in the request (0 when scope is request).")
    code: str
    field: str
    message: str
    user_id: str | None = Field(description="The request's user when known and valid, else null.")
    raw: str = Field(
        description=f"The offending event (scope event) or request body (scope request) as sent, cut to "
        f"{REJECTED_RAW_MAX_BYTES} bytes."
    )
    raw_truncated: bool


def encode_record(record: dict[str, Any]) -> bytes:
    """Serialise an :class:`EventRecord` / :class:`RejectedRecord` dict (orjson; ``orjson.Fragment`` allowed)."""
    return orjson.dumps(record)


class UnsupportedRecordVersion(ValueError):
    """A record of a version this code does not read (a newer gateway?): park it, do not guess."""


def decode_record(data: bytes) -> dict[str, Any]:
    """Parse a record value for the workers; raises ValueError on garbage or an unknown ``v``."""
    record = orjson.loads(data)
    if type(record) is not dict:
        raise ValueError("record is not a JSON object")
    if record.get("v") != RECORD_VERSION:
        raise UnsupportedRecordVersion(f"record version {record.get('v')!r}, expected {RECORD_VERSION}")
    return record


__all__ = [
    "NAME_PATTERN",
    "RECORD_EVENT_KEYS",
    "RECORD_VERSION",
    "INTEGER_RANGE_MESSAGE",
    "JSON_INT_MAX",
    "METRIC_VALUE_MAX",
    "METRIC_VALUE_MESSAGE",
    "JSON_INT_MIN",
    "AcceptedResult",
    "ApiV1Event",
    "ApiV1EventBatch",
    "FLOAT_RANGE_MESSAGE",
    "NumberLiteral",
    "EventRecord",
    "IngestResponse",
    "RecordEvent",
    "RejectedRecord",
    "RejectedResult",
    "TimestampError",
    "TrackRequest",
    "UnsupportedRecordVersion",
    "V1Event",
    "V1EventsRequest",
    "decode_record",
    "encode_record",
    "is_valid_name",
    "json_too_deep",
    "unrepresentable_number",
    "timestamp_ms",
]
