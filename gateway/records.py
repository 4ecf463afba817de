"""What the gateway writes to Kafka: record events, the per-user EventRecords, server event ids, dead letters.

Its own module because it is the wire format of the ``events`` and ``events.rejected`` topics that the workers
read (``schemas/events.py`` documents both records): how an accepted event is laid out, how a user's events are
packed into records under ``MAX_RECORD_BYTES``, which id an event without one gets, and what a rejected event or
a refused request leaves behind. Validation happens before (``gateway.rules``); which record goes where is
``gateway.ingest``'s call.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import orjson

from abstream.config import Settings
from gateway.rules import EMPTY_OBJECT, is_id
from schemas.errors import ApiError
from schemas.events import (
    MAX_RECORD_BYTES,
    RECORD_EVENT_KEYS,
    RECORD_VERSION,
    REJECTED_RAW_MAX_BYTES,
    NumberLiteral,
)

__all__ = [
    "REFUSALS_RECORDED",
    "PublishRecord",
    "ServerIds",
    "dead_letter",
    "encode_user",
    "new_record_event",
    "refused_request",
]

_dumps = orjson.dumps
_Fragment = orjson.Fragment


class PublishRecord(NamedTuple):
    """One Kafka record to send: ``key`` (user id, UTF-8; None for a rejected event without a user)."""

    key: bytes | None
    value: bytes
    event_ids: tuple[str, ...] = ()
    user_id: str | None = None
    client_event_ids: tuple[str, ...] = ()
    """The client-given event ids in this record (server ids are never retried): remember them once THIS record
    is acked."""


def _raw(ev: object) -> tuple[str, bool]:
    """What the client sent as text cut to REJECTED_RAW_MAX_BYTES: a parsed event as JSON, body bytes as they came."""
    if isinstance(ev, bytes):
        raw = ev
    else:
        try:
            raw = _dumps(ev, default=_literal)
        except (orjson.JSONEncodeError, TypeError):
            raw = f"<not serialisable: {type(ev).__name__}>".encode()
    if len(raw) <= REJECTED_RAW_MAX_BYTES:
        return raw.decode("utf-8", "replace"), False
    return raw[:REJECTED_RAW_MAX_BYTES].decode("utf-8", "ignore"), True


def _literal(value: object) -> Any:
    """orjson ``default``: a number too big to read is written back as the client sent it."""
    if type(value) is NumberLiteral:
        return _Fragment(value.text.encode())
    raise TypeError


def dead_letter(
    surface: str,
    received_at_ms: int,
    scope: str,
    index: int,
    code: str,
    path: str,
    message: str,
    user_id: str | None,
    sent: object,
) -> PublishRecord:
    """A ``RejectedRecord`` for ``events.rejected``; ``sent`` is the event (JSON) or the request body (bytes)."""
    raw, truncated = _raw(sent)
    value = _dumps(
        {
            "v": RECORD_VERSION,
            "surface": surface,
            "received_at_ms": received_at_ms,
            "scope": scope,
            "index": index,
            "code": code,
            "field": path,
            "message": message,
            "user_id": user_id,
            "raw": raw,
            "raw_truncated": truncated,
        }
    )
    return PublishRecord(user_id.encode() if user_id is not None else None, value)


REFUSALS_RECORDED = frozenset({400, 413, 415})
"""Statuses of a refused ingestion request that leave a dead letter: what the client sent was wrong."""


def refused_request(surface: str, received_at_ms: int, err: ApiError, settings: Settings) -> PublishRecord | None:
    """The dead letter of an ingestion request refused as a whole (malformed JSON, a bad envelope field, too many
    events, ...), or None when there is nothing to record: another status, a body never received, or a
    single-event endpoint's event already recorded."""
    if err.status not in REFUSALS_RECORDED or err.dead_lettered or err.code == "incomplete_body":
        return None
    sent = err.sent
    user_id = None
    if type(sent) is dict:
        candidate = sent.get("anonymous_user_id" if surface == "v1" else "user_id")
        user_id = candidate if is_id(candidate, settings.max_id_length) else None
    path = err.details[0]["field"] if err.details else "body"
    body = b"" if sent is None else sent  # None: refused before the body was read (e.g. by Content-Length)
    return dead_letter(surface, received_at_ms, "request", 0, err.code, path, err.message, user_id, body)


def new_record_event(kind: str, **values: Any) -> dict[str, Any]:
    """A record event with every key (null unless given): one flat shape for the workers."""
    event = dict.fromkeys(RECORD_EVENT_KEYS)
    event["kind"] = kind
    event["properties"] = event["context"] = EMPTY_OBJECT
    event.update(values)
    return event


class ServerIds:
    """UUIDv7 (RFC 9562) ids for events without a client event_id: time-ordered, ~120 ns each.

    uuid.uuid4() costs ~2 µs here, most of the per-event budget. 48-bit ms timestamp, then 74 random bits
    drawn once per request (``random`` is reseeded in forked workers) with the low 48 bits counting up
    within the request, so ids of one request are distinct and sort in request order.
    """

    __slots__ = ("prefix", "n")

    def __init__(self, received_at_ms: int) -> None:
        ts = received_at_ms & 0xFFFF_FFFF_FFFF
        r = random.getrandbits(74)
        self.prefix = f"{ts >> 16:08x}-{ts & 0xFFFF:04x}-7{r >> 62:03x}-{0x8000 | (r >> 48) & 0x3FFF:04x}-"
        self.n = r & 0xFFFF_FFFF_FFFF

    def next(self) -> str:
        self.n = n = (self.n + 1) & 0xFFFF_FFFF_FFFF
        return f"{self.prefix}{n:012x}"


def encode_user(
    out: list[PublishRecord],
    surface: str,
    user_id: str,
    received_at_ms: int,
    events: list[dict[str, Any]],
    event_ids: list[str],
    client_ids: list[str | None],
) -> None:
    """One EventRecord per user; split in halves (same key, order kept) while it exceeds MAX_RECORD_BYTES."""
    record = {"v": RECORD_VERSION, "user_id": user_id, "surface": surface, "received_at_ms": received_at_ms}
    record["events"] = events
    value = _dumps(record)
    if len(value) > MAX_RECORD_BYTES and len(events) > 1:
        h = len(events) // 2
        encode_user(out, surface, user_id, received_at_ms, events[:h], event_ids[:h], client_ids[:h])
        encode_user(out, surface, user_id, received_at_ms, events[h:], event_ids[h:], client_ids[h:])
        return
    client_event_ids = tuple(i for i in client_ids if i is not None)
    out.append(PublishRecord(user_id.encode(), value, tuple(event_ids), user_id, client_event_ids))
