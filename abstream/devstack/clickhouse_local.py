"""Embedded ClickHouse HTTP endpoint over chDB: a development and test component.

chDB runs the ClickHouse engine in-process, and only ONE process may open a data directory. This
process owns it and serves the ClickHouse HTTP protocol, so the gateway, the Faust workers, the
analysts and the tests all talk to it with plain clickhouse-connect over HTTP, exactly as they talk
to a real ClickHouse server in production (where CLICKHOUSE_URL points at that server instead).

What it serves (the subset clickhouse-connect, curl and Grafana-style SQL need):

- ``/ping`` and ``GET /`` answer ``Ok.``; queries go to ``/`` by GET (read-only, as ClickHouse) or
  POST, the SQL in ``query=`` and/or the body (ClickHouse semantics: URL query, a newline, the body);
- ``database=`` / ``X-ClickHouse-Database``, ``default_format=``, ``param_NAME=`` server-side
  parameters, settings as URL arguments, sessions (``session_id=``: SET/USE/temporary tables persist);
- ``INSERT ... FORMAT X`` with the data after the statement, request bodies in gzip, deflate, lz4
  (several back-to-back frames), zstd (several frames), xz, bz2 (and br when ``brotli`` is installed),
  chunked or not, and multipart/form-data query fields;
- results in the format the SQL names (TabSeparated when none), compressed when the client asks
  (``enable_http_compression=1`` + ``Accept-Encoding``), with ClickHouse's response headers;
- errors as ClickHouse sends them: a non-200 status, ``Code: N. DB::Exception: ...`` and the
  ``X-ClickHouse-Exception-Code`` header, never a Python traceback.

Each worker thread owns one chDB connection (connections to one path run in parallel in chDB; a
connection is used by one thread at a time), each session owns one more; pings never touch chDB,
so a slow query cannot starve them. User and password are accepted whatever they are: this is not
a security boundary, production authentication is the real server's job.
"""

from __future__ import annotations

import argparse
import asyncio
import bz2
import contextlib
import email.parser
import email.policy
import gzip
import json
import logging
import lzma
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import parse_qsl

import lz4.frame
import uvicorn
import zstandard
from chdb import _chdb  # the engine binding chdb.connect() wraps; it also exposes classify_query

try:  # optional, as in ClickHouse builds without it
    import brotli  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

log = logging.getLogger("abstream.clickhouse_local")

DEFAULT_WORKERS = 16
SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600
KEEP_ALIVE_S = 60
DEFAULT_FORMAT = "TabSeparated"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# ---------------------------------------------------------------------------------------------
# ClickHouse-shaped errors
# ---------------------------------------------------------------------------------------------

# Error codes this module raises itself (numbers from the engine's errorCodeToName).
UNSUPPORTED_METHOD = 1
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_SETTING = 115
READONLY = 164
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
STD_EXCEPTION = 1001

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp): clients
# (and retry logic keyed on 503/408) see the statuses a real server would send.
_STATUS_BY_CODE: dict[int, int] = {194: 401}
_STATUS_BY_CODE.update(dict.fromkeys((192, 193, 497, 512, 516), 403))
_STATUS_BY_CODE.update(
    dict.fromkeys(
        (6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223, 321, 376, 427, 441, 675, 676),
        400,
    )
)
_STATUS_BY_CODE.update(dict.fromkeys((46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511), 404))
_STATUS_BY_CODE.update({229: 413, 48: 501, 209: 503, 76: 503, 381: 411, 159: 408, 439: 503, 779: 415})

_CODE_RE = re.compile(r"Code: (\d+)\. ")


class ClickHouseError(Exception):
    """An error to send the way ClickHouse does; carries the engine's code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Keep the engine's own ``Code: N. DB::Exception: ...`` text, minus chDB's wrapper prefixes."""
        text = str(exc)
        match = _CODE_RE.search(text)
        if match is None:
            return cls(STD_EXCEPTION, f"Code: {STD_EXCEPTION}. DB::Exception: {text or type(exc).__name__}")
        return cls(int(match.group(1)), text[match.start() :])

    @classmethod
    def new(cls, code: int, name: str, text: str) -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})")

    @property
    def status(self) -> int:
        return _STATUS_BY_CODE.get(self.code, 500)

    def body(self, version: str) -> bytes:
        text = self.message.rstrip()
        if "(version " not in text:
            text = f"{text} (version {version})"
        return (text + "\n").encode("utf-8", "replace")


def not_utf8(exc: UnicodeDecodeError) -> ClickHouseError:
    """chDB takes SQL as text: a statement that is not UTF-8 is refused before it reaches the engine."""
    return ClickHouseError.new(BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Query is not valid UTF-8: {exc}")


# ---------------------------------------------------------------------------------------------
# SQL heads: where an INSERT's data starts, which output format a query names
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Request bodies: Content-Encoding (several back-to-back frames), multipart forms
# ---------------------------------------------------------------------------------------------


class _Decompressor(Protocol):
    eof: bool

    @property
    def unused_data(self) -> bytes | None: ...

    def decompress(self, data: bytes) -> bytes: ...


class StreamDecoder:
    """Decode a body made of one or more concatenated frames/members of one codec.

    clickhouse-connect compresses each insert block as its own lz4 (or zstd) frame: decoding only
    the first frame would silently keep the first 131,072 rows of a larger insert.
    """

    def __init__(self, factory: Callable[[], _Decompressor], name: str) -> None:
        self._factory = factory
        self._name = name
        self._current = factory()
        self._pending = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            while data:
                chunk = self._current.decompress(data)
                if chunk:
                    out.append(chunk)
                self._pending = True
                if self._current.eof:
                    data = self._current.unused_data or b""
                    self._current = self._factory()
                    self._pending = False
                else:
                    data = b""
        except Exception as exc:
            raise ClickHouseError.new(
                CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Cannot decode {self._name} request body: {exc}"
            ) from None
        return out

    def finish(self) -> None:
        if self._pending:
            raise ClickHouseError.new(
                CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Truncated {self._name} request body (incomplete frame)"
            )


def _decoder_factory(encoding: str) -> Callable[[], _Decompressor] | None:
    """The incremental decompressor for a Content-Encoding, None for identity."""
    factories: dict[str, Callable[[], Any]] = {
        "gzip": lambda: zlib.decompressobj(wbits=31),
        "x-gzip": lambda: zlib.decompressobj(wbits=31),
        "deflate": lambda: zlib.decompressobj(),
        "lz4": lz4.frame.LZ4FrameDecompressor,
        "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
        "xz": lzma.LZMADecompressor,
        "bz2": bz2.BZ2Decompressor,
    }
    if brotli is not None:
        factories["br"] = _BrotliAdapter
    if encoding in ("", "identity", "none"):
        return None
    factory = factories.get(encoding)
    if factory is None:
        raise ClickHouseError.new(
            UNSUPPORTED_METHOD, "UNSUPPORTED_METHOD", f"Unknown Content-Encoding of HTTP request: {encoding}"
        )
    return factory


class _BrotliAdapter:
    """Adapts brotli's Decompressor (no eof/unused_data) to the interface StreamDecoder uses."""

    def __init__(self) -> None:
        self.eof = False
        self.unused_data = b""
        self._decoder = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        out = self._decoder.process(data)
        self.eof = self._decoder.is_finished()
        return out


def decode_body(chunks: list[bytes], encoding: str) -> list[bytes]:
    """Decompress a request body per its Content-Encoding, keeping it as a list of chunks."""
    factory = _decoder_factory(encoding.strip().lower())
    if factory is None:
        return chunks
    decoder = StreamDecoder(factory, encoding)
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    decoder.finish()
    return out


def parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """Plain fields of a multipart/form-data body (query, param_*); files would be external tables."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    if not message.is_multipart():
        raise ClickHouseError.new(BAD_ARGUMENTS, "BAD_ARGUMENTS", "Cannot parse multipart/form-data body")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            raise ClickHouseError.new(
                NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED",
                f"External data (file part {name!r}) is not supported by the embedded endpoint",
            )
        payload = part.get_payload(decode=True)
        fields[name] = payload.decode("utf-8") if isinstance(payload, bytes) else str(payload or "")
    return fields


# ---------------------------------------------------------------------------------------------
# Responses: compression and content types
# ---------------------------------------------------------------------------------------------

# ClickHouse's chooseHTTPCompressionMethod order.
_RESPONSE_CODECS = ("zstd", "br", "lz4", "gzip", "deflate")


def choose_response_encoding(accept_encoding: str) -> str | None:
    offered = {item.split(";", 1)[0].strip().lower() for item in accept_encoding.split(",")}
    for codec in _RESPONSE_CODECS:
        if codec in offered and (codec != "br" or brotli is not None):
            return codec
    return None


def compress_response(body: bytes, codec: str, level: int) -> bytes:
    """One frame/stream per response: what clickhouse-connect's decoders expect."""
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(body)
    if codec == "lz4":
        return lz4.frame.compress(body)
    if codec == "gzip":
        return gzip.compress(body, compresslevel=level)
    if codec == "deflate":
        return zlib.compress(body, level)
    if codec == "br" and brotli is not None:
        return brotli.compress(body)
    return body


def content_type_for(fmt: str) -> str:
    name = fmt.lower()
    if name.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if name.startswith("csv"):
        return "text/csv; charset=UTF-8; header=" + ("present" if "withnames" in name else "absent")
    if name.startswith("json") and "eachrow" in name:
        return "application/x-ndjson; charset=UTF-8"
    if name.startswith("json"):
        return "application/json; charset=UTF-8"
    if name in ("xml",):
        return "application/xml; charset=UTF-8"
    if name.startswith(("native", "rowbinary", "parquet", "arrow", "orc", "avro", "protobuf", "msgpack", "capnproto")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


# ---------------------------------------------------------------------------------------------
# Engine: chDB connections with tracked per-connection state
# ---------------------------------------------------------------------------------------------

# URL arguments that are part of the HTTP protocol, not settings (HTTPHandler's reserved names).
_RESERVED_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "stacktrace",
        "role",
        "client_protocol_version",
        "readonly",
    }
)
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MUTATING = frozenset({"MUTATING", "MUTATING_GLOBAL"})


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class Engine:
    """The one chDB engine of this process, plus what every connection must start from."""

    PRELUDE = "SET implicit_select = 0"  # as a ClickHouse server: '1+1' alone is a syntax error

    def __init__(self, data_path: str) -> None:
        self.path = os.path.abspath(data_path)
        os.makedirs(self.path, exist_ok=True)
        try:
            self._keeper = _chdb.connect(self.path)  # holds the engine (and its file lock) open
        except Exception as exc:
            raise RuntimeError(
                f"cannot open chDB data directory {self.path}: {exc}. chDB lets only one process open a "
                "directory: is another clickhouse-local (or chDB user) running on it?"
            ) from exc
        self._keeper.query(self.PRELUDE, "TabSeparated")
        info = self._keeper.query("SELECT version(), timezone()", "TabSeparated").bytes().decode()
        self.version, self.timezone = info.rstrip("\n").split("\t")
        self.baseline = self._changed_settings(self._keeper)
        self.display_name = socket.gethostname()
        self._lock = threading.Lock()
        self._slots: list[Slot] = []
        self._local = threading.local()

    @staticmethod
    def _changed_settings(conn: Any) -> dict[str, str]:
        raw = conn.query("SELECT name, value FROM system.settings WHERE changed", "JSONCompactEachRow").bytes()
        return {row[0]: row[1] for row in map(json.loads, raw.splitlines()) if row}

    def connect(self) -> Any:
        conn = _chdb.connect(self.path)
        conn.query(self.PRELUDE, "TabSeparated")
        return conn

    def new_slot(self, session: bool) -> Slot:
        slot = Slot(self, session)
        with self._lock:
            self._slots.append(slot)
        return slot

    def thread_slot(self) -> Slot:
        """The calling worker thread's own connection, created on first use."""
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = self.new_slot(session=False)
            self._local.slot = slot
        return slot

    def drop_slot(self, slot: Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        slot.close()

    def close(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, []
        for slot in slots:
            slot.close()
        with contextlib.suppress(Exception):
            self._keeper.close()


class Slot:
    """One chDB connection and the state we put on it (database, settings), so a request's URL
    settings apply to that request only, and a session's SET/USE persist for that session only.

    ``current`` is what is set on the connection (relative to the engine baseline); ``base`` is what
    every request on this slot starts from (empty for a worker thread, SETs of a session).
    """

    def __init__(self, engine: Engine, session: bool) -> None:
        self.engine = engine
        self.session = session
        self.conn: Any = engine.connect()
        self.db = "default"
        self.current: dict[str, str] = {}
        self.base: dict[str, str] = {}
        self.base_db = "default"

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _reconnect(self) -> None:
        self.close()
        self.conn = self.engine.connect()
        self.db = "default"
        self.current = {}

    def run(self, sql: str, fmt: str = "TabSeparated", params: dict[str, str] | None = None) -> Any:
        try:
            return self.conn.query(sql, fmt, params=params or {})
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None

    def prepare(self, database: str | None, settings: dict[str, str]) -> dict[str, str]:
        """Put the connection in the request's state; returns the effective settings."""
        desired = {**self.base, **settings}
        if desired != self.current:
            assignments = [
                f"{name} = {_literal(value)}" for name, value in desired.items() if self.current.get(name) != value
            ]
            for name in self.current.keys() - desired.keys():
                baseline = self.engine.baseline.get(name)
                assignments.append(f"{name} = {'DEFAULT' if baseline is None else _literal(baseline)}")
            if assignments:
                self._apply(assignments, desired)
        target_db = database or self.base_db
        if target_db != self.db:
            self.run(f"USE {_identifier(target_db)}")
            self.db = target_db
        return desired

    def _apply(self, assignments: list[str], desired: dict[str, str]) -> None:
        try:
            self.run("SET " + ", ".join(assignments))
        except ClickHouseError:
            self.resync(statement=None)  # possibly half-applied: learn what is really set, then fail
            raise
        self.current = dict(desired)

    def resync(self, statement: str | None) -> None:
        """Re-read settings and database after a SET/USE statement (its first keyword) or a failed SET.

        A session keeps what its statement changed; a worker's connection left readonly by a
        ``SET readonly = 1`` is replaced, since no later SET could undo it for the next request.
        """
        before = dict(self.current)
        changed = Engine._changed_settings(self.conn)
        self.current = {k: v for k, v in changed.items() if self.engine.baseline.get(k) != v}
        db = self.run("SELECT currentDatabase()").bytes().decode().rstrip("\n")
        if self.session and statement is not None:
            for name, value in self.current.items():
                if before.get(name) != value:
                    self.base[name] = value
            for name in before.keys() - self.current.keys():
                self.base.pop(name, None)
            if statement == "USE":
                self.base_db = db
        self.db = db
        if not self.session and self.current.get("readonly", "0") != "0":
            self._reconnect()


# ---------------------------------------------------------------------------------------------
# Request execution (in a worker thread)
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    params: dict[str, str]
    headers: dict[str, str]
    body: list[bytes]


@dataclass
class Response:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def _summary(
    read_rows: int,
    read_bytes: int,
    written_rows: int,
    written_bytes: int,
    result_rows: int,
    result_bytes: int,
    elapsed_s: float,
) -> str:
    """X-ClickHouse-Summary; values are strings as ClickHouse sends them (clients call isnumeric())."""
    return json.dumps(
        {
            "read_rows": str(read_rows),
            "read_bytes": str(read_bytes),
            "written_rows": str(written_rows),
            "written_bytes": str(written_bytes),
            "total_rows_to_read": str(read_rows),
            "result_rows": str(result_rows),
            "result_bytes": str(result_bytes),
            "elapsed_ns": str(int(elapsed_s * 1e9)),
        },
        separators=(",", ":"),
    )


class Executor:
    """Turns one HTTP request into chDB calls on a slot; always answers, never raises."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def error(self, exc: ClickHouseError, query_id: str) -> Response:
        return Response(
            exc.status,
            exc.body(self.engine.version),
            [
                ("content-type", "text/plain; charset=UTF-8"),
                ("x-clickhouse-exception-code", str(exc.code)),
                ("x-clickhouse-query-id", query_id),
                ("x-clickhouse-server-display-name", self.engine.display_name),
            ],
        )

    def handle(self, request: Request, slot: Slot | None, query_id: str) -> Response:
        started = time.perf_counter()
        try:
            return self._handle(request, slot or self.engine.thread_slot(), query_id, started)
        except ClickHouseError as exc:
            return self.error(exc, query_id)
        except Exception as exc:  # never a traceback to the client
            log.exception("internal error while serving a query")
            return self.error(
                ClickHouseError.new(STD_EXCEPTION, "STD_EXCEPTION", f"{type(exc).__name__}: {exc}"), query_id
            )

    def _handle(self, request: Request, slot: Slot, query_id: str, started: float) -> Response:
        params = dict(request.params)
        chunks = decode_body(request.body, request.headers.get("content-encoding", ""))
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            params.update(parse_multipart(b"".join(chunks), content_type))
            chunks = []
        if params.get("decompress", "0") not in ("", "0"):
            raise ClickHouseError.new(
                NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED",
                "decompress=1 (ClickHouse-native compressed body) is not supported by the embedded endpoint; "
                "use Content-Encoding",
            )

        settings: dict[str, str] = {}
        query_params: dict[str, str] = {}
        for name, value in params.items():
            if name.startswith("param_"):
                query_params[name[6:]] = value
            elif name not in _RESERVED_PARAMS:
                if not _SETTING_NAME_RE.match(name):
                    raise ClickHouseError.new(UNKNOWN_SETTING, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
                settings[name] = value
        readonly = params.get("readonly", "0") or "0"

        # The statement: URL query, a newline, then the body (ClickHouse's HTTPHandler).
        head = params.get("query", "").encode("utf-8")
        split: InsertSplit | None = None
        data: list[bytes] = []
        sql_bytes = b""
        if head:
            head += b"\n"
            split = split_insert(head)
            if split is not None:  # clickhouse-connect: statement in the URL, (binary) data = body
                data = [head[split.data_offset :], *chunks]
        if split is None:
            sql_bytes = head + b"".join(chunks)
            split = split_insert(sql_bytes)
            if split is not None:
                data = [sql_bytes[split.data_offset :]]
        statement_bytes = split.statement.encode() if split is not None else sql_bytes

        info = slot.conn.classify_query(statement_bytes.decode("utf-8", "replace"))
        if info["statement_count"] == 0 and not statement_bytes.strip(b" \t\r\n;"):
            raise ClickHouseError.new(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
        if info["statement_count"] > 1:
            raise ClickHouseError.new(SYNTAX_ERROR, "SYNTAX_ERROR", "Syntax error (Multi-statements are not allowed)")
        query_class = info["query_class"].name
        if request.method == "GET" and query_class in _MUTATING:
            raise ClickHouseError.new(
                READONLY,
                "READONLY",
                "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
                "You should use method POST for modifying queries",
            )
        if readonly != "0" and (query_class in _MUTATING or (readonly == "1" and query_class == "CONTROL")):
            raise ClickHouseError.new(READONLY, "READONLY", "Cannot execute query in readonly mode")

        database = request.headers.get("x-clickhouse-database") or params.get("database") or None
        effective = slot.prepare(database, settings)
        headers: list[tuple[str, str]] = []
        if split is not None:
            body, summary = self._insert(slot, split, data, started)
        else:
            default_fmt = params.get("default_format") or request.headers.get("x-clickhouse-format") or DEFAULT_FORMAT
            body, summary = self._query(slot, sql_bytes, default_fmt, query_params, started)
            if query_class in ("READ_ONLY", "UNKNOWN"):  # statements with a result name its format
                fmt = output_format(sql_bytes) or default_fmt
                headers += [("content-type", content_type_for(fmt)), ("x-clickhouse-format", fmt)]
            if query_class == "CONTROL":
                slot.resync(first_keyword(sql_bytes))
        if not any(name == "content-type" for name, _ in headers):
            headers.append(("content-type", "text/plain; charset=UTF-8"))
        headers += [
            ("x-clickhouse-server-display-name", self.engine.display_name),
            ("x-clickhouse-query-id", query_id),
            ("x-clickhouse-timezone", effective.get("session_timezone") or self.engine.timezone),
            ("x-clickhouse-summary", summary),
        ]
        if effective.get("add_http_cors_header", "0") not in ("0", "false", ""):
            headers.append(("access-control-allow-origin", "*"))
        if body and effective.get("enable_http_compression", "0") not in ("0", "false", ""):
            codec = choose_response_encoding(request.headers.get("accept-encoding", ""))
            if codec is not None:
                level = effective.get("http_zlib_compression_level", "3")
                body = compress_response(body, codec, max(1, min(int(level) if level.isdigit() else 3, 9)))
                headers.append(("content-encoding", codec))
        return Response(200, body, headers)

    def _insert(self, slot: Slot, split: InsertSplit, data: list[bytes], started: float) -> tuple[bytes, str]:
        conn = slot.conn
        try:
            handle = conn.send_insert(split.statement, split.fmt)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        try:
            for part in data:
                if part:
                    conn.insert_append(handle, part)
            result = conn.insert_done(handle)
        except Exception as exc:
            with contextlib.suppress(Exception):
                conn.insert_cancel(handle)
            raise ClickHouseError.from_engine(exc) from None
        rows, size = result.rows_written(), result.bytes_written()
        return b"", _summary(rows, size, rows, size, rows, size, time.perf_counter() - started)

    def _query(
        self, slot: Slot, sql_bytes: bytes, default_fmt: str, query_params: dict[str, str], started: float
    ) -> tuple[bytes, str]:
        try:
            sql = sql_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise not_utf8(exc) from None
        result = slot.run(sql, default_fmt, query_params)
        body = result.bytes()
        summary = _summary(
            result.storage_rows_read(),
            result.storage_bytes_read(),
            result.rows_written(),
            result.bytes_written(),
            result.rows_read(),
            result.bytes_read(),
            time.perf_counter() - started,
        )
        return body, summary


# ---------------------------------------------------------------------------------------------
# HTTP (ASGI) layer: pings on the event loop, queries in worker threads, sessions
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    slot: Slot | None = None
    busy: bool = False
    timeout_s: float = SESSION_TIMEOUT_S
    last_used: float = field(default_factory=time.monotonic)


class App:
    """The ASGI application: routing, body reading and sessions; chDB work goes to the pool."""

    def __init__(self, engine: Engine, workers: int = DEFAULT_WORKERS) -> None:
        self.engine = engine
        self.executor = Executor(engine)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chdb")
        self.sessions: dict[str, Session] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except Exception:  # the response may not have started: answer like ClickHouse would
            log.exception("internal error in the HTTP layer")
            error = ClickHouseError.new(STD_EXCEPTION, "STD_EXCEPTION", "internal error in the embedded endpoint")
            with contextlib.suppress(Exception):
                await self._send(send, self.executor.error(error, ""), head_only=False)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._reaper = asyncio.create_task(self._reap_sessions())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._reaper is not None:
                    self._reaper.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _reap_sessions(self) -> None:
        """Close sessions idle past their timeout (ClickHouse's session_timeout, default 60 s)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session_id, session in list(self.sessions.items()):
                if not session.busy and now - session.last_used > session.timeout_s:
                    del self.sessions[session_id]
                    if session.slot is not None:
                        await loop.run_in_executor(self.pool, self.engine.drop_slot, session.slot)

    @staticmethod
    async def _send(send: Send, response: Response, head_only: bool) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        headers.append((b"keep-alive", f"timeout={KEEP_ALIVE_S}".encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head_only else response.body})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"].upper()
        path = scope["path"]
        head_only = method == "HEAD"
        raw_query = scope.get("query_string", b"").decode("utf-8", "replace")
        if path in ("/ping", "/replicas_status") or (path == "/" and method in ("GET", "HEAD") and not raw_query):
            await self._send(send, Response(200, b"Ok.\n", [("content-type", "text/html; charset=UTF-8")]), head_only)
            return
        params = dict(parse_qsl(raw_query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        if method not in ("GET", "HEAD", "POST"):
            error = ClickHouseError.new(
                UNSUPPORTED_METHOD, "UNSUPPORTED_METHOD", f"HTTP method {method} is not supported"
            )
            await self._send(send, replace(self.executor.error(error, query_id), status=405), head_only)
            return
        if path != "/" and method != "POST" and not params:  # as ClickHouse: any path takes queries
            error = ClickHouseError.new(
                UNSUPPORTED_METHOD,
                "UNSUPPORTED_METHOD",
                f"There is no handle {path}. Use / or /ping for health checks, send queries to / (GET or POST)",
            )
            await self._send(send, replace(self.executor.error(error, query_id), status=404), head_only)
            return

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                body.append(chunk)
            if not message.get("more_body", False):
                break
        request = Request(method, params, headers, body)

        loop = asyncio.get_running_loop()
        session_id = params.get("session_id", "")
        if not session_id:
            response = await loop.run_in_executor(self.pool, self.executor.handle, request, None, query_id)
            await self._send(send, response, head_only)
            return
        response = await self._in_session(request, session_id, query_id, loop)
        await self._send(send, response, head_only)

    async def _in_session(
        self, request: Request, session_id: str, query_id: str, loop: asyncio.AbstractEventLoop
    ) -> Response:
        """Run on the session's own connection; one query at a time per session, as ClickHouse."""
        params = request.params
        session = self.sessions.get(session_id)
        if session is None:
            if params.get("session_check", "0") not in ("", "0"):
                error = ClickHouseError.new(SESSION_NOT_FOUND, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                return self.executor.error(error, query_id)
            session = Session()
            self.sessions[session_id] = session
        if session.busy:
            error = ClickHouseError.new(
                SESSION_IS_LOCKED, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client"
            )
            return self.executor.error(error, query_id)
        try:
            timeout = float(params.get("session_timeout") or session.timeout_s)
        except ValueError:
            timeout = session.timeout_s
        session.timeout_s = max(1.0, min(timeout, MAX_SESSION_TIMEOUT_S))
        session.busy = True
        try:
            if session.slot is None:
                session.slot = await loop.run_in_executor(self.pool, self.engine.new_slot, True)
            return await loop.run_in_executor(self.pool, self.executor.handle, request, session.slot, query_id)
        finally:
            session.busy = False
            session.last_used = time.monotonic()
            if params.get("close_session", "0") not in ("", "0"):
                self.sessions.pop(session_id, None)
                if session.slot is not None:
                    await loop.run_in_executor(self.pool, self.engine.drop_slot, session.slot)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.sessions.clear()


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after shutdown; we want to close chDB cleanly instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(host: str, port: int, data_path: str, *, workers: int = DEFAULT_WORKERS) -> None:
    """Serve the ClickHouse HTTP protocol over chDB on host:port until SIGINT/SIGTERM.

    Opens (and so locks) ``data_path`` first, so a second instance on the same directory fails
    at once; on a signal, finishes in-flight requests, then closes every chDB connection.
    """
    engine = Engine(data_path)
    app = App(engine, workers=workers)
    try:
        sock = _bind(host, port)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=30,
            server_header=False,
            date_header=True,
        )
        server = _Server(config)
        log.warning(
            "clickhouse-local (chDB %s, development/test endpoint) serving http://%s:%d, data %s",
            engine.version,
            host,
            bound_port,
            engine.path,
        )
        server.run(sockets=[sock])
    finally:
        app.close()
        engine.close()
        log.warning("clickhouse-local stopped; data in %s", engine.path)


HELP = (
    "Embedded ClickHouse HTTP endpoint over chDB. This is a DEVELOPMENT AND TEST component: it lets "
    "the gateway, the stream workers, analysts and tests speak plain clickhouse-connect over HTTP on a "
    "machine without a ClickHouse server. It owns its data directory (chDB allows one process per "
    "directory) and accepts any user/password. Production points CLICKHOUSE_URL at a ClickHouse server "
    "instead of running this."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abstream.devstack.clickhouse_local", description=HELP)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="HTTP port (default 8123, ClickHouse's)")
    parser.add_argument("--path", required=True, help="chDB data directory (created if missing)")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"worker threads, each with its own chDB connection (default {DEFAULT_WORKERS})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.host, args.port, args.path, workers=args.workers)
    except (RuntimeError, OSError) as exc:
        print(f"clickhouse-local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
