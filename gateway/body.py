"""Request bodies -> JSON values: the media type, decompression within limits, the number and depth scan, and
duplicate keys.

Its own module because it is the one part of ingestion that deals in bytes rather than events: everything here
runs once per request before any event is looked at, and every refusal is of the request as a whole (an
:class:`~schemas.errors.ApiError`, 415/413/400). The routes call :func:`decode_body`, then one of
``gateway.ingest``'s ``ingest_*`` functions on its result, which ends with :func:`refuse_duplicate_keys` (the
other routes call it right after decoding, in ``gateway.plumbing.read_json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from itertools import repeat
from typing import Any, Literal

import numpy as np
import orjson

from abstream.config import Settings
from schemas.errors import ApiError
from schemas.events import JSON_INT_MAX, JSON_INT_MIN, NumberLiteral, unrepresentable_number

__all__ = ["JSON_CHARSETS", "JSON_MEDIA_TYPES", "decode_body", "refuse_duplicate_keys"]

JSON_MEDIA_TYPES = frozenset({"application/json", "text/plain"})
"""``text/plain`` is accepted because ``navigator.sendBeacon`` and no-preflight ``fetch`` send it; the body
must still be JSON. Anything else (form posts, missing header) is 415: a client that does not say JSON
is usually sending something else."""
JSON_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii"})
"""JSON is UTF-8 (RFC 8259); a declared other charset is 415 rather than mojibake in the warehouse."""
_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
"""Content-Encoding accepted: gzip, and deflate (zlib-wrapped as HTTP says; raw deflate also read, since
some clients send that). br, zstd and others are 415. One coding only (``identity`` is ignored)."""
_CHUNK = 256 * 1024


def _media_type(content_type: str | None) -> None:
    if content_type == "application/json":  # the common case, exactly as browsers and SDKs send it
        return
    if not content_type:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    parts = content_type.split(";")
    media = parts[0].strip().lower()
    if media not in JSON_MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, not {media[:64]!r}")
    for param in parts[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in JSON_CHARSETS:
            raise ApiError(415, "unsupported_media_type", "JSON bodies must be UTF-8 (charset=utf-8)")


def _coding(content_encoding: str | None) -> int | None:
    if not content_encoding:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _CODINGS:
        return _CODINGS[codings[0]]
    raise ApiError(
        415,
        "unsupported_content_encoding",
        f"Content-Encoding {content_encoding[:64]!r} is not supported: use gzip, deflate or none",
    )


def _decompress(body: bytes, wbits: int, settings: Settings) -> bytes:
    """Inflate ``body`` in bounded steps: stop at the first byte past either limit, never holding the bomb."""
    gzip = wbits == 31
    name = "gzip" if gzip else "deflate"
    if not gzip and body[:1] and (body[0] & 0x0F != 8 or int.from_bytes(body[:2], "big") % 31):
        wbits = -15  # no zlib header: raw deflate
    ratio_cap = settings.max_compression_ratio * len(body)
    cap = min(settings.max_decompressed_bytes, ratio_cap)
    out: list[bytes] = []
    total = 0
    data = body
    d = zlib.decompressobj(wbits)
    try:
        while True:
            want = min(cap - total + 1, _CHUNK)
            chunk = d.decompress(data, want)
            total += len(chunk)
            if total > cap:
                if ratio_cap < settings.max_decompressed_bytes:
                    raise ApiError(
                        413,
                        "compression_ratio_exceeded",
                        f"body inflates more than {settings.max_compression_ratio}x (max_compression_ratio)",
                    )
                raise ApiError(
                    413,
                    "decompressed_too_large",
                    f"body is larger than {settings.max_decompressed_bytes} bytes once decompressed",
                )
            out.append(chunk)
            if d.eof:
                rest = d.unused_data
                if not rest:
                    break
                if gzip and rest[:2] == b"\x1f\x8b":  # another gzip member (concatenated streams)
                    d = zlib.decompressobj(wbits)
                    data = rest
                    continue
                raise ApiError(400, f"invalid_{name}", f"unexpected bytes after the end of the {name} stream")
            data = d.unconsumed_tail
            if not data and len(chunk) < want:
                raise ApiError(400, f"invalid_{name}", f"truncated {name} stream")
    except zlib.error as exc:
        raise ApiError(400, f"invalid_{name}", f"corrupt {name} body: {exc}") from None
    return b"".join(out)


def decode_body(
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
    settings: Settings,
    *,
    big_integers: Literal["refuse", "mark"] = "refuse",
) -> Any:
    """Bytes of a request -> JSON value, or ApiError (415/413/400) saying exactly what is wrong.

    Check order: Content-Type (415), size as sent (413), Content-Encoding (415), decompression limits
    (413), gzip integrity (400), JSON (400). NaN/Infinity are not JSON: 400 ``non_finite_value`` (Python's
    json.dumps emits them) rather than a generic ``malformed_json``. Routes should refuse a too-large
    Content-Length before reading the body; the size is checked here again regardless. A refusal carries
    ``sent``: the body, decompressed when it could be, for the dead letter of a refused ingestion request.

    A number no 64-bit reader keeps as written (an integer outside [-2^63, 2^64-1], or beyond the double range
    like 1e999) is refused as a whole request (400 ``integer_out_of_range`` / ``non_finite_value``, with its
    path) with ``big_integers="refuse"``; with ``"mark"`` (ingestion, where one event must not sink its
    neighbours) it becomes a :class:`~schemas.events.NumberLiteral` for the event's own validation to reject.

    Duplicate keys are not refused here but by :func:`refuse_duplicate_keys` on the returned value, which the
    ingestion core calls with the keys it counted while walking the events (cheaper than counting them here).
    """
    try:
        _media_type(content_type)
        if len(body) > settings.max_body_bytes:
            raise ApiError(413, "payload_too_large", f"body is larger than {settings.max_body_bytes} bytes")
        wbits = _coding(content_encoding)
        if wbits is not None:
            body = _decompress(body, wbits, settings)  # from here on, the dead letter shows JSON, not gzip bytes
        return _decode_json(body, big_integers)
    except ApiError as err:
        err.sent = body
        raise


def _decode_json(body: bytes, big_integers: Literal["refuse", "mark"]) -> Any:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        pos = exc.pos if isinstance(exc.pos, int) else 0
        head = bytes(body[pos : pos + 9])
        if "infinity" in msg or head.startswith((b"NaN", b"Infinity", b"-Infinity")):
            # A number beyond the double range (1e999, or an integer of 310+ digits) is valid JSON: refuse only the
            # event that holds it. NaN and Infinity are not JSON at all: the whole body is refused.
            if "infinity" in msg and _has_unrepresentable(exact := _reread_or_none(body, strict=True), big_integers):
                _DECODED.set((exact, body.translate(_SCAN), body))
                return exact
            raise ApiError(
                400, "non_finite_value", f"NaN and Infinity are not JSON numbers (at char {pos}): {msg}"
            ) from None
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {msg}") from None
    # orjson reads an integer beyond 64 bits as a float, silently. Only a run of 19+ digits can be one; the
    # scan costs ~0.85 ns/byte (~0.3 µs per 330-byte event), the exact re-read only bodies that have a run.
    # The same mapped bytes count the keys written, for refuse_duplicate_keys.
    scan = body.translate(_SCAN)
    if scan.find(_NINETEEN_DIGITS) >= 0:
        exact = _reread_or_none(body)
        # exact == value: the digit run was in a string or a fraction (a C-speed check before the walk)
        if exact is not None and _differ(exact, value) and _has_unrepresentable(exact, big_integers):
            value = exact
    if type(value) is dict or type(value) is list:
        _DECODED.set((value, scan, body))
    return value


_SCAN = bytes(48 if 48 <= b <= 57 else 34 if b in b'" \t\r\n' else 58 if b == 58 else 32 for b in range(256))
"""Digits -> ``0`` (a run of 19 is a candidate integer beyond 64 bits); ``"`` and JSON whitespace -> ``"``, ``:`` kept
(every key then ends in ``":``, even one written ``"key" : 1``); anything else -> a space."""
_NINETEEN_DIGITS = b"0" * 19  # the shortest integer literal outside [-2^63, 2^64-1]: -9223372036854775809

_DECODED: ContextVar[tuple[Any, bytes, bytes] | None] = ContextVar("abstream_decoded_body", default=None)
"""The last object or array :func:`decode_body` returned in this context (one request: one task), with the mapped
and the plain bytes it came from, for :func:`refuse_duplicate_keys`."""


def refuse_duplicate_keys(value: Any, kept: int | None = None) -> None:
    """400 ``duplicate_key`` when an object of the body ``value`` was decoded from names a key twice: orjson keeps
    the last one without a word, another reader (a proxy, the client's own log) the first, so the request would mean
    two things. ``value`` not from :func:`decode_body` in this context (a test's dict): nothing to compare.

    Cheap proof for the common case, exact check otherwise. Every key written ends in ``":`` in the mapped bytes
    (more pairs: a string holding ``\\":`` or starting with a colon), and the keys orjson kept are at most the keys
    written, equal only without duplicates: once ``kept`` reaches the pairs, no key was dropped. The ingestion core
    passes ``kept``, counted in its own walk of the events (~0.05 µs per event; counting them again here would be
    ~0.3 µs); without it the objects where request bodies have keys are counted. A body still short (nested
    properties) is counted in full, and only one short after that is read again keeping every member (``json``,
    ~10x slower than orjson), to find the duplicate or clear it.
    """
    decoded = _DECODED.get()
    if decoded is None or decoded[0] is not value:
        return
    _DECODED.set(None)
    _, scan, body = decoded
    written = _keys_written(scan)
    if written == 0 or written <= (_key_floor(value) if kept is None else kept) or written <= _key_count(value):
        return
    found = _first_duplicate(body)
    if found is not None:
        message = "appears twice in one object; JSON readers disagree on which value counts"
        detail = {"field": found, "code": "duplicate_key", "message": message}
        raise ApiError(400, "duplicate_key", f"{found}: {message}", [detail], sent=body)


_PAIR = int(np.frombuffer(b'":', np.uint16)[0])
_NUMPY_FROM = 4096


def _keys_written(scan: bytes) -> int:
    """The ``":`` pairs of the mapped body: at least the keys written. numpy compares a large body's byte pairs 8 KiB
    at a time, at even then odd offsets, ~2x as fast as ``bytes.count`` (~1 ns/byte for a two-byte needle)."""
    n = len(scan)
    if n < _NUMPY_FROM:  # below, numpy's call overhead costs more than it saves
        return scan.count(b'":')
    even = np.frombuffer(scan, np.uint16, n // 2)
    odd = np.frombuffer(scan, np.uint16, (n - 1) // 2, 1)
    return int(np.count_nonzero(even == _PAIR)) + int(np.count_nonzero(odd == _PAIR))


_is_dict = dict.__instancecheck__
_get = dict.get


def _key_floor(value: Any) -> int:
    """The keys of ``value``'s objects where ingestion bodies have them (the request, its events and their
    properties/context, or one object and the objects in it): exact for those, fewer for other shapes. C-level
    maps, not a walk: this runs on every request."""
    if type(value) is dict:
        events = value.get("events")
        if type(events) is not list:
            return len(value) + sum(map(len, filter(_is_dict, value.values())))
        n = len(value)
    elif type(value) is list:
        n, events = 0, value
    else:
        return 0
    items = list(filter(_is_dict, events))
    n += sum(map(len, items))
    n += sum(map(len, filter(_is_dict, map(_get, items, repeat("properties")))))
    return n + sum(map(len, filter(_is_dict, map(_get, items, repeat("context")))))


def _key_count(value: Any) -> int:
    """Every key of every object in ``value`` (a walk: only for bodies :func:`_key_floor` does not cover)."""
    n = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            n += len(item)
            stack.extend(c for c in item.values() if type(c) is dict or type(c) is list)
        elif type(item) is list:
            stack.extend(c for c in item if type(c) is dict or type(c) is list)
    return n


class _Members(list):  # type: ignore[type-arg]
    """An object read with every member kept, in order: (key, value) pairs."""


def _first_duplicate(body: bytes) -> str | None:
    """The path (``events.0.properties.price``) of the first key an object of ``body`` repeats, or None."""
    with _nesting_orjson_reads():
        try:  # numbers as text: only the keys matter, and int() refuses 4,301 digits
            tree = json.loads(body, object_pairs_hook=_Members, parse_int=str, parse_float=str, parse_constant=str)
        except (RecursionError, ValueError):  # orjson read it, so this cannot happen; nothing to refuse then
            return None
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        path, item = stack.pop()
        prefix = f"{path}." if path else ""
        if type(item) is _Members:
            seen: set[str] = set()
            for key, _child in item:
                if key in seen:
                    return f"{prefix}{key}"
                seen.add(key)
            stack.extend((f"{prefix}{key}", child) for key, child in reversed(item))
        elif type(item) is list:
            stack.extend((f"{prefix}{i}", child) for i, child in reversed(list(enumerate(item))))
    return None


def _int_literal(text: str) -> int | NumberLiteral:
    if len(text) > 21:  # beyond any 64-bit integer; int() of a 4,301-digit string would even raise
        return NumberLiteral(text)
    value = int(text)
    return value if JSON_INT_MIN <= value <= JSON_INT_MAX else NumberLiteral(text)


def _float_literal(text: str) -> float | NumberLiteral:
    value = float(text)
    return NumberLiteral(text) if math.isinf(value) else value


def _not_json(text: str) -> Any:
    raise ValueError(text)  # NaN, Infinity


_ORJSON_MAX_DEPTH = 1024


@contextlib.contextmanager
def _nesting_orjson_reads() -> Iterator[None]:
    """Python's recursion limit raised for a moment, so that the standard library's JSON reader, writer and
    comparisons go as deep as orjson reads (1,024 levels) from wherever the route is called. An event nested that
    deep is then rejected on its own (too deep), not the whole request."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + _ORJSON_MAX_DEPTH + 64)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _differ(exact: Any, value: Any) -> bool:
    with _nesting_orjson_reads():
        try:
            return bool(exact != value)
        except RecursionError:
            return True


def _reread_or_none(body: bytes, strict: bool = False) -> Any:
    """``body`` read again with the numbers orjson cannot keep as NumberLiteral, or None when it is not JSON.

    Only for bodies that may hold such a number. ``strict``: orjson stopped at the number, so it never saw the
    rest; the standard library reads lone surrogates (``"\\ud800"``) that orjson refuses, so the result must
    also be valid UTF-8 once written (else None: the body is refused as malformed, as without the number).
    The check writes with the standard library, not orjson: orjson writes only 254 levels.
    """
    with _nesting_orjson_reads():
        try:
            exact = json.loads(body, parse_int=_int_literal, parse_float=_float_literal, parse_constant=_not_json)
            if strict:
                json.dumps(exact, ensure_ascii=False, default=_placeholder).encode()
        except RecursionError:  # deeper than orjson reads: no event of it could be kept anyway
            raise ApiError(400, "too_deep", f"body nests deeper than {_ORJSON_MAX_DEPTH} levels") from None
        except ValueError:  # not JSON, or a lone surrogate (UnicodeEncodeError)
            return None
    return exact


def _placeholder(value: object) -> int:
    """json.dumps ``default`` of the surrogate check: a NumberLiteral's text is ASCII digits, any stand-in will do."""
    if type(value) is NumberLiteral:
        return 0
    raise TypeError


def _has_unrepresentable(exact: Any, big_integers: Literal["refuse", "mark"]) -> bool:
    """True when ``exact`` holds a NumberLiteral to be rejected per event; refused as a whole with "refuse"."""
    if exact is None:
        return False
    bad = unrepresentable_number(exact)
    if bad is None:
        return False
    if big_integers == "refuse":
        path, code, message = bad
        field = path or "body"
        raise ApiError(400, code, f"{field}: {message}", [{"field": field, "code": code, "message": message}])
    return True
