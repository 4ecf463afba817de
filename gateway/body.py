"""Request bodies -> JSON values: the media type, decompression within limits, and the number and depth scan.

Its own module because it is the one part of ingestion that deals in bytes rather than events: everything here
runs once per request before any event is looked at, and every refusal is of the request as a whole (an
:class:`~schemas.errors.ApiError`, 415/413/400). The routes call :func:`decode_body`, then one of
``gateway.ingest``'s ``ingest_*`` functions on its result.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import orjson

from abstream.config import Settings
from schemas.errors import ApiError
from schemas.events import JSON_INT_MAX, JSON_INT_MIN, NumberLiteral, unrepresentable_number

__all__ = ["JSON_CHARSETS", "JSON_MEDIA_TYPES", "decode_body"]

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
                return exact
            raise ApiError(
                400, "non_finite_value", f"NaN and Infinity are not JSON numbers (at char {pos}): {msg}"
            ) from None
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {msg}") from None
    # orjson reads an integer beyond 64 bits as a float, silently. Only a run of 19+ digits can be one; the
    # scan costs ~0.85 ns/byte (~0.3 µs per 330-byte event), the exact re-read only bodies that have a run.
    if body.translate(_DIGITS_TO_ZERO).find(_NINETEEN_DIGITS) >= 0:
        exact = _reread_or_none(body)
        # exact == value: the digit run was in a string or a fraction (a C-speed check before the walk)
        if exact is not None and _differ(exact, value) and _has_unrepresentable(exact, big_integers):
            return exact
    return value


_DIGITS_TO_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_NINETEEN_DIGITS = b"0" * 19  # the shortest integer literal outside [-2^63, 2^64-1]: -9223372036854775809


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
