"""One HTTP request turned into chDB calls on a slot, in a worker thread: URL arguments to settings and
parameters, the statement (URL query, a newline, the body), readonly rules, INSERT data streamed to the engine,
the result in the format asked, ClickHouse's response headers. Always answers, never raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field

from abstream.devstack.clickhouse_codecs import (
    choose_response_encoding,
    compress_response,
    decode_body,
    parse_multipart,
)
from abstream.devstack.clickhouse_engine import Engine, Slot
from abstream.devstack.clickhouse_errors import (
    NOT_IMPLEMENTED,
    READONLY,
    STD_EXCEPTION,
    SYNTAX_ERROR,
    UNKNOWN_SETTING,
    ClickHouseError,
    not_utf8,
)
from abstream.devstack.clickhouse_sql import InsertSplit, first_keyword, output_format, split_insert

log = logging.getLogger("abstream.clickhouse_local")

DEFAULT_FORMAT = "TabSeparated"

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
