"""SQL heads, as ClickHouse's HTTP handler reads them before the engine does: where an ``INSERT ... FORMAT X``
statement ends and its (possibly binary) data starts, which output format a query names, its first keyword.

Only the statement is tokenised, never the data after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from abstream.devstack.clickhouse_errors import not_utf8

_TOKEN_RE = re.compile(
    rb"""
      (?P<ws>\s+)
    | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<str>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    | (?P<qid>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    | (?P<word>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
    | (?P<num>[0-9][A-Za-z0-9_.]*)
    | (?P<open>[(\[{])
    | (?P<close>[)\]}])
    | (?P<semi>;)
    | (?P<other>.)
    """,
    re.S | re.X,
)
_NOT_FORMAT_CLAUSE_AFTER = {b"INTO", b"TABLE", b"FUNCTION", b".", b"AS"}


def _significant(buf: bytes) -> Iterable[tuple[str, bytes, int, int, int]]:
    """Tokens that matter (no whitespace or comments) as (kind, text, start, end, depth)."""
    depth = 0
    for match in _TOKEN_RE.finditer(buf):
        kind = match.lastgroup or "other"
        if kind in ("ws", "comment"):
            continue
        if kind == "open":
            depth += 1
            yield kind, match.group(), match.start(), match.end(), depth
            continue
        if kind == "close":
            depth = max(0, depth - 1)
        yield kind, match.group(), match.start(), match.end(), depth


@dataclass(frozen=True)
class InsertSplit:
    """``INSERT ... FORMAT X`` cut where ClickHouse cuts it: statement, format, data offset."""

    statement: str
    fmt: str
    data_offset: int


def split_insert(buf: bytes) -> InsertSplit | None:
    """Find ``INSERT ... FORMAT name`` at depth 0; the data starts after the name, blanks, one newline.

    Returns None for anything else (SELECT, INSERT ... VALUES, INSERT ... SELECT), which the engine
    runs as a whole. Only the statement is tokenised, never the (possibly binary) data after it.
    """
    prev = b""
    format_at = -1
    first = True
    for kind, text, start, end, depth in _significant(buf):
        upper = text.upper()
        if first:
            if kind != "word" or upper != b"INSERT":
                return None
            first = False
            prev = upper
            continue
        if depth == 0 and kind == "semi":
            return None
        if format_at >= 0:
            if kind != "word" or depth != 0:
                format_at = -1
            else:
                offset = end
                while offset < len(buf) and buf[offset] in b" \t\f":
                    offset += 1
                if offset < len(buf) and buf[offset] == 0x0D:
                    offset += 1
                if offset < len(buf) and buf[offset] == 0x0A:
                    offset += 1
                try:
                    statement = buf[:format_at].decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise not_utf8(exc) from None
                return InsertSplit(statement, text.decode("ascii", "replace"), offset)
        if depth == 0 and kind == "word":
            if upper == b"VALUES" and prev not in _NOT_FORMAT_CLAUSE_AFTER:
                return None
            if upper == b"FORMAT" and prev not in _NOT_FORMAT_CLAUSE_AFTER:
                format_at = start
        prev = upper if kind == "word" else text
    return None


def output_format(buf: bytes) -> str | None:
    """The format a query's trailing ``FORMAT name [SETTINGS ...]`` clause names, if any."""
    found: str | None = None
    state = 0  # 0: scanning, 1: after FORMAT, 2: after FORMAT name (confirm on end/;/SETTINGS)
    candidate = b""
    prev = b""
    for kind, text, _start, _end, depth in _significant(buf):
        upper = text.upper() if kind == "word" else text
        if state == 2:
            if depth == 0 and (kind == "semi" or upper == b"SETTINGS"):
                found = candidate.decode("ascii", "replace")
            state = 0
        elif state == 1:
            state, candidate = (2, text) if kind == "word" and depth == 0 else (0, b"")
        if state == 0 and depth == 0 and upper == b"FORMAT" and prev not in _NOT_FORMAT_CLAUSE_AFTER:
            state = 1
        prev = upper
    if state == 2:
        found = candidate.decode("ascii", "replace")
    return found


def first_keyword(buf: bytes) -> str:
    """The statement's first word, upper-case (USE vs SET after a CONTROL statement)."""
    for kind, text, *_ in _significant(buf):
        return text.upper().decode("ascii", "replace") if kind == "word" else ""
    return ""
