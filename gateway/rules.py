"""The per-event validation rules: names, ids, timestamps and the clock-skew correction, properties/context.

Its own module because these are the rules themselves, apart from how a request is walked: each check raises
:class:`Reject` for the one event it fails (``gateway.ingest`` turns that into a per-event rejection and a dead
letter) or returns the value as the record stores it; :func:`envelope` and :func:`check_count` build the
refusal of a whole request. ``ingest_v1``'s loop inlines the common case of several of them (each falls back to
the function here, which also produces the rejection), so a change of a rule is a change there too.
``schemas/events.py`` holds the pydantic models of the same contract and the rule functions both share.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from abstream.config import Settings
from schemas.errors import ApiError
from schemas.events import (
    NAME_MAX_LENGTH,
    TIMESTAMP_MAX_CHARS,
    TimestampError,
    is_valid_name,
    json_too_deep,
    timestamp_ms,
    unrepresentable_number,
)

__all__ = [
    "EMPTY_OBJECT",
    "EPOCH",
    "Limits",
    "Reject",
    "check_count",
    "checked_name",
    "clock_skew",
    "corrected_time",
    "envelope",
    "event_time",
    "id_message",
    "is_id",
    "json_object",
    "limits",
    "optional_id",
]

_dumps = orjson.dumps
_fromisoformat = datetime.fromisoformat
_Fragment = orjson.Fragment
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EMPTY_OBJECT = orjson.Fragment(b"{}")
"""properties/context when the event has none (or ``{}``): the record still carries an object."""


class Limits:
    """The settings the rules read, in the units they compare in (ms), as attributes of one slotted object."""

    __slots__ = ("future_ms", "age_ms", "obj_bytes", "depth", "id_len", "max_events")

    def __init__(self, s: Settings) -> None:
        self.future_ms = s.max_future_skew_s * 1000
        self.age_ms = s.max_event_age_s * 1000
        self.obj_bytes = s.max_properties_bytes
        self.depth = s.max_json_depth
        self.id_len = s.max_id_length
        self.max_events = s.max_events_per_batch


_limits_cache: dict[int, tuple[Settings, Limits]] = {}


def limits(settings: Settings) -> Limits:
    """The :class:`Limits` of ``settings``, made once per Settings object (requests share theirs)."""
    entry = _limits_cache.get(id(settings))
    if entry is None or entry[0] is not settings:
        if len(_limits_cache) > 64:
            _limits_cache.clear()
        entry = _limits_cache[id(settings)] = (settings, Limits(settings))
    return entry[1]


class Reject(Exception):  # noqa: N818 - control flow of the ingestion core, never escapes gateway.ingest
    """One event is rejected: ``field`` is relative to the event (``""`` = the event itself)."""

    __slots__ = ("code", "field", "message")

    def __init__(self, code: str, field: str, message: str) -> None:
        self.code = code
        self.field = field
        self.message = message


def envelope(code: str, field: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, f"{field}: {message}", [{"field": field, "code": code, "message": message}])


def is_id(value: object, max_len: int) -> bool:
    """A non-blank string of at most ``max_len`` characters without NUL: C strings, terminals and many a database
    (PostgreSQL text) end a string at the first NUL, so an id holding one would be cut, or refused, downstream."""
    return type(value) is str and 0 < len(value) <= max_len and not value.isspace() and "\x00" not in value


def id_message(max_len: int) -> str:
    return f"must be a non-blank string of at most {max_len} characters, without NUL (U+0000)"


def checked_name(ev: dict[str, Any], key: str) -> str:
    value = ev.get(key)
    if is_valid_name(value):
        return value  # type: ignore[return-value]
    if value is None:
        raise Reject(f"missing_{key}", key, "is required")
    raise Reject(
        f"invalid_{key}",
        key,
        f"must be 1..{NAME_MAX_LENGTH} characters: a letter or $ first, then letters, digits or _ . : $ -",
    )


def event_time(value: object, key: str, lim: Limits, received_at_ms: int, what: str = "occurred_at") -> int:
    """Parsed occurred_at (or sent_at: ``what``) within [received_at - max_event_age_s, received_at +
    max_future_skew_s]; codes ``{what}_in_future``, ``{what}_too_old``, ``invalid_{what}``, ``naive_{what}``.

    Boundaries are inclusive: exactly max_future_skew_s ahead is accepted, one millisecond more is not.
    """
    if type(value) is str and len(value) <= TIMESTAMP_MAX_CHARS:  # fast path of timestamp_ms()
        try:
            dt = _fromisoformat(value)
        except ValueError:
            dt = None
        if dt is not None and dt.tzinfo is not None:
            td = dt - EPOCH
            ms = td.days * 86_400_000 + td.seconds * 1000 + td.microseconds // 1000
            ahead = ms - received_at_ms
            if ahead <= lim.future_ms and -ahead <= lim.age_ms:
                return ms
    try:
        ms = timestamp_ms(value)
    except TimestampError as exc:
        raise Reject(f"{exc.reason}_{what}", key, exc.message) from None
    ahead = ms - received_at_ms
    if ahead > lim.future_ms:
        raise Reject(
            f"{what}_in_future",
            key,
            f"is {ahead / 1000:.3f} s after the server's receive time; at most {lim.future_ms // 1000} s allowed",
        )
    if -ahead > lim.age_ms:
        hint = " (epoch SECONDS? send milliseconds)" if type(value) is int and value < 100_000_000_000 else ""
        raise Reject(
            f"{what}_too_old",
            key,
            f"is more than {lim.age_ms // 1000} s before the server's receive time{hint}",
        )
    return ms


def corrected_time(occurred_ms: int, skew_ms: int, key: str, lim: Limits, received_at_ms: int) -> int:
    """occurred_at on the server's clock, ``occurred_at + (received_at - sent_at)``, within occurred_at's window.

    Each time is checked on its own first; their combination is checked here. The corrected time is ahead of the
    receive time exactly when occurred_at is after sent_at on the device's own clock: an event after the send of
    the batch carrying it, impossible (the same max_future_skew_s of slack applies). Stored, it would sit up to
    max_event_age_s in the future. Older than max_event_age_s once corrected: too old, as when uncorrected.
    """
    corrected = occurred_ms + skew_ms
    ahead = corrected - received_at_ms  # == occurred_at - sent_at
    if ahead > lim.future_ms:
        raise Reject(
            "occurred_at_after_sent_at",
            key,
            f"is {ahead / 1000:.3f} s after sent_at (the device's clock): an event cannot happen after the batch "
            f"carrying it was sent; at most {lim.future_ms // 1000} s allowed",
        )
    if -ahead > lim.age_ms:
        raise Reject(
            "occurred_at_too_old",
            key,
            f"is more than {lim.age_ms // 1000} s before the server's receive time once corrected for the device's "
            "clock (occurred_at + received_at - sent_at)",
        )
    return corrected


def _shallow(raw: bytes, depth: int) -> bool:
    """Cheap proof that serialised JSON nests at most ``depth`` levels, without walking the object.

    Nesting depth <= the number of ``{`` and ``[`` bytes (those inside strings only add to the count).
    The only ``{`` is the first byte and no ``[`` at all: a flat object, the common case (~65 ns for 100
    bytes, written as ``rfind`` and ``in``: ``find(123, 1)`` takes ~2x as long for its argument parsing, two
    ``bytes.count`` ~3x).
    """
    return (raw.rfind(123) == 0 and 91 not in raw) or raw.count(123) + raw.count(91) <= depth


def json_object(value: object, key: str, lim: Limits) -> Any:
    """properties/context: an object within the size and depth limits, as an orjson.Fragment.

    Serialised once, here: the size check needs the bytes and the record embeds them as they are.
    """
    if type(value) is dict and value:
        try:
            raw = _dumps(value)
        except orjson.JSONEncodeError:  # deeper than orjson writes (254), an integer beyond 64 bits, not JSON
            if json_too_deep(value, lim.depth):  # first: a number's path 1,000 levels down is no help
                raise Reject(f"{key}_too_deep", key, f"nests deeper than {lim.depth} levels") from None
            bad = unrepresentable_number(value)
            if bad is not None:
                raise Reject(bad[1], f"{key}.{bad[0]}", bad[2]) from None
            raise Reject(f"invalid_{key}", key, "is not serialisable JSON") from None
        if len(raw) > lim.obj_bytes:
            raise Reject(f"{key}_too_large", key, f"is {len(raw)} bytes serialised; at most {lim.obj_bytes} allowed")
        if not _shallow(raw, lim.depth) and json_too_deep(value, lim.depth):
            raise Reject(f"{key}_too_deep", key, f"nests deeper than {lim.depth} levels")
        return _Fragment(raw)
    if value is None or type(value) is dict:
        return EMPTY_OBJECT
    raise Reject(f"invalid_{key}", key, "must be a JSON object")


def optional_id(ev: dict[str, Any], key: str, lim: Limits) -> str | None:
    value = ev.get(key)
    if value is None or is_id(value, lim.id_len):
        return value  # type: ignore[return-value]
    raise Reject(f"invalid_{key}", key, id_message(lim.id_len))


def clock_skew(sent_at: object, lim: Limits, received_at_ms: int) -> int:
    """skew_ms = received_at - sent_at; raises Reject (field ``sent_at``).

    sent_at obeys occurred_at's window: a device clock more than max_future_skew_s fast has its events refused
    anyway, and a sent_at far from an occurred_at that passed would "correct" it into another century.
    """
    return received_at_ms - event_time(sent_at, "sent_at", lim, received_at_ms, "sent_at")


def check_count(n: int, lim: Limits, field: str) -> None:
    if n > lim.max_events:
        raise envelope(
            "too_many_events", field, f"{n} events; at most {lim.max_events} per request (max_events_per_batch)", 413
        )
