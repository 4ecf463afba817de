"""The embedded ClickHouse HTTP endpoint (chDB) as every other process sees it: over HTTP.

The endpoint runs as a subprocess, exactly as `abstream clickhouse-local` runs it, and is driven with
clickhouse-connect (sync and async), httpx and curl. Restart and SIGKILL tests run their own
instances on their own data directories.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import clickhouse_connect
import httpx
import lz4.frame
import pytest
import zstandard
from clickhouse_connect.driver.exceptions import DatabaseError

from abstream.devstack.clickhouse_auth import is_loopback
from abstream.devstack.clickhouse_sql import output_format, split_insert

REPO = Path(__file__).resolve().parent.parent
MODULE = "abstream.devstack.clickhouse_local"


@dataclass
class Endpoint:
    proc: subprocess.Popen[bytes]
    port: int
    path: Path
    log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, **kwargs: object) -> clickhouse_connect.driver.Client:
        return clickhouse_connect.get_client(host=self.host, port=self.port, **kwargs)

    async def async_client(self, **kwargs: object) -> clickhouse_connect.driver.AsyncClient:
        return await clickhouse_connect.get_async_client(host=self.host, port=self.port, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_endpoint(path: Path, log: Path, *, host: str = "127.0.0.1", env: dict[str, str] | None = None) -> Endpoint:
    """Start `python -m abstream.devstack.clickhouse_local` and wait until /ping answers."""
    port = _free_port(host)
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--host", host, "--port", str(port), "--path", str(path)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = Endpoint(proc, port, path, log, host)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"endpoint exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{endpoint.url}/ping", timeout=1).text == "Ok.\n":
                return endpoint
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    endpoint.stop(signal.SIGKILL)
    raise RuntimeError(f"endpoint did not answer /ping: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    root = tmp_path_factory.mktemp("clickhouse_local")
    endpoint = start_endpoint(root / "data", root / "endpoint.log")
    yield endpoint
    assert endpoint.stop() == 0, endpoint.log.read_text()[-2000:]


@pytest.fixture(scope="module")
def client(ch: Endpoint) -> Iterator[clickhouse_connect.driver.Client]:
    c = ch.client(username="analyst", password="anything")
    yield c
    c.close()


def post(
    ch: Endpoint,
    sql: str | bytes = b"",
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> httpx.Response:
    return httpx.request(method, f"{ch.url}/", params=params, content=sql, headers=headers, timeout=30)


# --- the connect sequence, pings, GET/POST, curl ---------------------------------------------------


def test_connect_sequence_sync_and_raw(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    assert client.server_version.startswith("26.")
    assert client.command("SELECT 1") == 1
    assert client.ping()
    version_tz = post(ch, "SELECT version(), timezone()").text.rstrip("\n").split("\t")
    assert version_tz[0] == client.server_version
    settings = post(ch, "SELECT name, value, readonly FROM system.settings LIMIT 10000 FORMAT JSONEachRow")
    names = {json.loads(line)["name"] for line in settings.text.splitlines()}
    assert {"max_threads", "insert_deduplication_token", "enable_http_compression"} <= names
    check = post(ch, "SELECT 1 AS check FORMAT Native", params={"client_protocol_version": "54405"})
    assert check.status_code == 200 and b"check" in check.content
    assert check.headers["x-clickhouse-format"] == "Native"


def test_async_client_connects_queries_inserts(ch: Endpoint) -> None:
    async def scenario() -> None:
        ac = await ch.async_client(username="u", password="p")
        try:
            assert ac.server_version.startswith("26.")
            await ac.command("CREATE TABLE async_t (id UInt32, name String) ENGINE = MergeTree ORDER BY id")
            summary = await ac.insert("async_t", [[i, f"n{i}"] for i in range(500)], column_names=["id", "name"])
            assert summary.written_rows == 500
            result = await ac.query(
                "SELECT count(), max(id) FROM async_t WHERE id >= {lo:UInt32}", parameters={"lo": 100}
            )
            assert result.result_rows == [(400, 499)]
            with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
                await ac.query("SELECT * FROM async_missing")
        finally:
            await ac.close()

    asyncio.run(scenario())


def test_ping_root_and_unknown_path(ch: Endpoint) -> None:
    ping = httpx.get(f"{ch.url}/ping")
    assert (ping.status_code, ping.text) == (200, "Ok.\n")
    assert httpx.head(f"{ch.url}/ping").status_code == 200
    assert httpx.get(f"{ch.url}/").text == "Ok.\n"
    missing = httpx.get(f"{ch.url}/nope")
    assert missing.status_code == 404 and missing.text.startswith("Code: ")
    assert httpx.get(f"{ch.url}/any/path", params={"query": "SELECT 1"}).text == "1\n"  # as ClickHouse


def test_curl_select_1(ch: Endpoint) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-sS", f"{ch.url}/?query=SELECT%201"], capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"1\n"


def test_get_post_and_url_query_then_body(ch: Endpoint) -> None:
    assert httpx.get(f"{ch.url}/", params={"query": "SELECT 40 + 2"}).text == "42\n"
    assert post(ch, "SELECT 'posted'").text == "posted\n"
    # ClickHouse semantics: the URL query, a newline, then the body.
    assert post(ch, "+ 1", params={"query": "SELECT 41"}).text == "42\n"
    post(ch, params={"query": "CREATE TABLE kv (k String, v UInt32) ENGINE = MergeTree ORDER BY k"}).raise_for_status()
    post(ch, "a,1\nb,2\n", params={"query": "INSERT INTO kv FORMAT CSV"}).raise_for_status()
    post(ch, "INSERT INTO kv FORMAT TabSeparated\nc\t3\n").raise_for_status()
    post(ch, "INSERT INTO kv VALUES ('d', 4)").raise_for_status()
    assert post(ch, "SELECT groupArray(k), sum(v) FROM (SELECT * FROM kv ORDER BY k)").text == "['a','b','c','d']\t10\n"
    readonly = httpx.get(f"{ch.url}/", params={"query": "INSERT INTO kv VALUES ('e', 5)"})
    assert readonly.status_code == 500 and readonly.headers["x-clickhouse-exception-code"] == "164"


def test_database_argument_header_and_any_credentials(ch: Endpoint) -> None:
    post(ch, "CREATE DATABASE IF NOT EXISTS analytics").raise_for_status()
    post(ch, "CREATE TABLE analytics.visits (n UInt8) ENGINE = MergeTree ORDER BY n").raise_for_status()
    post(ch, "INSERT INTO analytics.visits VALUES (1), (2)").raise_for_status()
    assert post(ch, "SELECT count() FROM visits", params={"database": "analytics"}).text == "2\n"
    assert post(ch, "SELECT currentDatabase()", headers={"X-ClickHouse-Database": "analytics"}).text == "analytics\n"
    assert post(ch, "SELECT currentDatabase()").text == "default\n"  # no leak into the next request
    db_client = ch.client(database="analytics", username="someone", password="whatever")
    assert db_client.command("SELECT count() FROM visits") == 2
    db_client.close()
    assert post(ch, "SELECT 1", params={"user": "x", "password": "y"}).text == "1\n"
    assert post(ch, "SELECT 1", headers={"X-ClickHouse-User": "x", "X-ClickHouse-Key": "y"}).text == "1\n"
    unknown = post(ch, "SELECT 1", params={"database": "no_such_db"})
    assert unknown.status_code == 404 and "UNKNOWN_DATABASE" in unknown.text


# --- command, parameters, settings ------------------------------------------------------------------


def test_parameters_and_settings(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    result = client.query(
        "SELECT {s:String}, {n:UInt64} + 1, {a:Array(String)}, {d:DateTime}",
        parameters={"s": "it's\ta 'test'", "n": 41, "a": ["x", "y'z"], "d": "2024-01-02 03:04:05"},
    )
    assert result.result_rows[0][:3] == ("it's\ta 'test'", 42, ["x", "y'z"])
    assert post(ch, "SELECT {x:UInt8} * 2", params={"param_x": "21"}).text == "42\n"
    assert client.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    default_threads = post(ch, "SELECT getSetting('max_threads')").text
    assert post(ch, "SELECT getSetting('max_threads')", params={"max_threads": "1"}).text == "1\n"
    assert post(ch, "SELECT getSetting('max_threads')").text == default_threads  # per request only
    assert client.query("SELECT number FROM numbers(10)", settings={"max_result_rows": 100}).row_count == 10
    # HTTP-protocol arguments clients send are not settings and must not fail.
    protocol = {
        "session_id": "",
        "compress": "0",
        "wait_end_of_query": "1",
        "query_id": "q-1",
        "buffer_size": "4096",
        "client_protocol_version": "54405",
        "stacktrace": "0",
        "quota_key": "k",
        "role": "",
    }
    answer = post(ch, "SELECT 1", params=protocol)
    assert answer.text == "1\n" and answer.headers["x-clickhouse-query-id"] == "q-1"
    with pytest.raises(DatabaseError, match="UNKNOWN_SETTING"):
        client.query("SELECT 1", settings={"no_such_setting_xyz": 1})
    assert client.command("SELECT 1") == 1  # a rejected setting leaves the connection clean


def test_form_encoded_query_parameters(ch: Endpoint) -> None:
    form_client = ch.client(form_encode_query_params=True)
    ids = list(range(3000))
    result = form_client.query("SELECT length({ids:Array(UInt32)}), {s:String}", parameters={"ids": ids, "s": "ok"})
    assert result.result_rows == [(3000, "ok")]
    form_client.close()


def test_sessions_keep_set_use_and_lock(ch: Endpoint) -> None:
    first = ch.client()  # autogenerated session_id, as by default
    other = ch.client()
    first.command("SET max_threads = 7")
    assert first.command("SELECT getSetting('max_threads')") == 7
    assert other.command("SELECT getSetting('max_threads')") != 7
    first.command("CREATE TEMPORARY TABLE scratch (x UInt8)")
    first.command("INSERT INTO scratch VALUES (7)")
    assert first.command("SELECT sum(x) FROM scratch") == 7
    first.command("USE system")
    assert first.command("SELECT currentDatabase()") == "system"
    assert other.command("SELECT currentDatabase()") == "default"
    first.close()
    other.close()
    # Without a session a SET does not outlive its request.
    post(ch, "SET max_threads = 7").raise_for_status()
    assert post(ch, "SELECT getSetting('max_threads')").text != "7\n"
    # One query at a time per session, as ClickHouse; session_check on an unknown session fails.
    sid = str(uuid.uuid4())
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post, ch, "SELECT sleep(1)", params={"session_id": sid})
        time.sleep(0.3)
        locked = post(ch, "SELECT 1", params={"session_id": sid})
        assert slow.result().status_code == 200
    assert locked.status_code == 500 and locked.headers["x-clickhouse-exception-code"] == "373"
    missing = post(ch, "SELECT 1", params={"session_id": "nope", "session_check": "1"})
    assert missing.headers["x-clickhouse-exception-code"] == "372"
    # Sessions end: explicitly (close_session=1) or after session_timeout seconds idle.
    closing, short = str(uuid.uuid4()), str(uuid.uuid4())
    post(ch, "SELECT 1", params={"session_id": closing, "close_session": "1"}).raise_for_status()
    post(ch, "SELECT 1", params={"session_id": short, "session_timeout": "1"}).raise_for_status()
    assert post(ch, "SELECT 1", params={"session_id": short, "session_check": "1"}).text == "1\n"
    time.sleep(2.5)
    for gone in (closing, short):
        expired = post(ch, "SELECT 1", params={"session_id": gone, "session_check": "1"})
        assert expired.headers.get("x-clickhouse-exception-code") == "372"


def test_set_readonly_does_not_poison_shared_connections(ch: Endpoint) -> None:
    """A session-less `SET readonly = 1` lands on a worker's connection; later requests must not see it."""
    for _ in range(24):
        post(ch, "SET readonly = 1").raise_for_status()
    post(ch, "CREATE TABLE after_readonly (x UInt8) ENGINE = MergeTree ORDER BY x").raise_for_status()
    for i in range(24):
        post(ch, f"INSERT INTO after_readonly VALUES ({i})").raise_for_status()
    assert post(ch, "SELECT count() FROM after_readonly").text == "24\n"
    refused = post(ch, "INSERT INTO after_readonly VALUES (99)", params={"readonly": "1"})
    assert refused.headers["x-clickhouse-exception-code"] == "164"


# --- inserts: Native, compression, chunked, large, dedup, materialized views ------------------------

EVENT_COLUMNS = ["id", "user", "variant", "value"]


def _event_table(client: clickhouse_connect.driver.Client, name: str, extra: str = "") -> None:
    client.command(
        f"CREATE TABLE {name} (id UInt64, user String, variant LowCardinality(String), value Float64) "
        f"ENGINE = MergeTree ORDER BY id {extra}"
    )


@pytest.mark.parametrize("compress", ["lz4", "zstd", False])
def test_native_insert_compressions(ch: Endpoint, compress: str | bool) -> None:
    c = ch.client(compress=compress)
    table = f"ins_{compress or 'none'}"
    _event_table(c, table)
    rows = [[i, f"u{i % 97}", "ab"[i % 2], i / 2] for i in range(20_000)]
    assert c.insert(table, rows, column_names=EVENT_COLUMNS).written_rows == 20_000
    assert c.query(f"SELECT count(), sum(id), uniqExact(user) FROM {table}").result_rows == [(20_000, 199_990_000, 97)]
    assert c.query(f"SELECT * FROM {table} ORDER BY id LIMIT 2").result_rows == [
        (0, "u0", "a", 0.0),
        (1, "u1", "b", 0.5),
    ]
    c.close()


def test_300k_row_lz4_insert_is_complete(ch: Endpoint) -> None:
    """Several back-to-back lz4 frames (one per 131,072-row block): all of them must be decoded."""
    c = ch.client(compress="lz4")
    c.command("CREATE TABLE big_lz4 (id UInt64, user String) ENGINE = MergeTree ORDER BY id")
    n = 300_000
    summary = c.insert(
        "big_lz4",
        [list(range(n)), [f"u{i % 1000}" for i in range(n)]],
        column_names=["id", "user"],
        column_oriented=True,
    )
    assert summary.written_rows == n
    assert c.query("SELECT count(), sum(id) FROM big_lz4").result_rows == [(n, n * (n - 1) // 2)]
    c.close()


def test_compressed_and_chunked_request_bodies(ch: Endpoint) -> None:
    post(ch, "CREATE TABLE bodies (k String, v UInt32) ENGINE = MergeTree ORDER BY k").raise_for_status()
    data = b"".join(b"k%d,%d\n" % (i, i) for i in range(1000))
    insert = {"query": "INSERT INTO bodies FORMAT CSV"}
    encodings = {
        "gzip": gzip.compress(data),
        "deflate": zlib.compress(data),
        "lz4": lz4.frame.compress(data[:5000]) + lz4.frame.compress(data[5000:]),
        "zstd": zstandard.ZstdCompressor().compress(data[:3000]) + zstandard.ZstdCompressor().compress(data[3000:]),
    }
    for encoding, body in encodings.items():
        post(ch, body, params=insert, headers={"Content-Encoding": encoding}).raise_for_status()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 777):
            yield data[i : i + 777]

    chunked = httpx.post(f"{ch.url}/", params=insert, content=chunks(), timeout=30)
    assert chunked.status_code == 200, chunked.text
    assert post(ch, "SELECT count(), sum(v) FROM bodies").text == f"{5000}\t{5 * 499500}\n"
    # The statement itself may be in a compressed body too.
    statement_in_body = gzip.compress(b"INSERT INTO bodies FORMAT CSV\nzz,1\n")
    post(ch, statement_in_body, headers={"Content-Encoding": "gzip"}).raise_for_status()
    truncated = post(ch, lz4.frame.compress(data)[:-9], params=insert, headers={"Content-Encoding": "lz4"})
    assert truncated.status_code == 500 and "CANNOT_DECOMPRESS" in truncated.text
    assert post(ch, "SELECT count() FROM bodies").text == "5001\n"


def test_insert_deduplication_token(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    _event_table(client, "dedup_events", "SETTINGS non_replicated_deduplication_window = 100")
    rows = [[i, "u", "a", 1.0] for i in range(1000)]
    for _ in range(2):
        client.insert(
            "dedup_events", rows, column_names=EVENT_COLUMNS, settings={"insert_deduplication_token": "batch-0001"}
        )
    assert client.command("SELECT count() FROM dedup_events") == 1000
    client.insert(
        "dedup_events", rows, column_names=EVENT_COLUMNS, settings={"insert_deduplication_token": "batch-0002"}
    )
    assert client.command("SELECT count() FROM dedup_events") == 2000
    # The token applies to its own request only: a later insert without one is not swallowed by it.
    client.insert("dedup_events", [[5000, "v", "b", 2.0]], column_names=EVENT_COLUMNS)
    assert client.command("SELECT count() FROM dedup_events") == 2001


def test_materialized_view_fires_on_insert(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    _event_table(client, "mv_source")
    client.command(
        "CREATE TABLE mv_totals (variant String, n UInt64, total Float64) ENGINE = SummingMergeTree ORDER BY variant"
    )
    client.command(
        "CREATE MATERIALIZED VIEW mv_rollup TO mv_totals AS "
        "SELECT variant, count() AS n, sum(value) AS total FROM mv_source GROUP BY variant"
    )
    client.insert("mv_source", [[i, "u", "ab"[i % 2], 1.0] for i in range(100)], column_names=EVENT_COLUMNS)
    assert client.query(
        "SELECT variant, sum(n), sum(total) FROM mv_totals GROUP BY variant ORDER BY variant"
    ).result_rows == [("a", 50, 50.0), ("b", 50, 50.0)]


# --- results: formats, headers, compression ----------------------------------------------------------


def test_result_formats_and_headers(ch: Endpoint) -> None:
    sql = "SELECT number AS n, toString(number) AS s FROM numbers(2)"
    default = post(ch, sql)
    assert default.text == "0\t0\n1\t1\n"
    assert default.headers["x-clickhouse-format"] == "TabSeparated"
    assert default.headers["content-type"].startswith("text/tab-separated-values")
    assert default.headers["x-clickhouse-timezone"]
    assert default.headers["x-clickhouse-server-display-name"]
    assert json.loads(default.headers["x-clickhouse-summary"])["result_rows"] == "2"
    each = post(ch, sql + " FORMAT JSONEachRow")
    assert [json.loads(line) for line in each.text.splitlines()] == [{"n": 0, "s": "0"}, {"n": 1, "s": "1"}]
    assert each.headers["x-clickhouse-format"] == "JSONEachRow"
    doc = post(ch, sql + " FORMAT JSON")
    assert doc.json()["rows"] == 2 and doc.headers["content-type"].startswith("application/json")
    assert post(ch, sql + " FORMAT CSVWithNames").text == '"n","s"\n0,"0"\n1,"1"\n'
    assert post(ch, sql + " SETTINGS max_threads = 1 FORMAT CSV").headers["x-clickhouse-format"] == "CSV"
    compact = post(ch, sql, params={"default_format": "JSONCompactEachRow"})
    assert [json.loads(line) for line in compact.text.splitlines()] == [[0, "0"], [1, "1"]]
    assert compact.headers["x-clickhouse-format"] == "JSONCompactEachRow"
    native = post(ch, sql + " FORMAT Native")
    assert native.headers["content-type"] == "application/octet-stream" and native.content[:2] == b"\x02\x02"
    ddl = post(ch, "CREATE TABLE IF NOT EXISTS fmt_ddl (x UInt8) ENGINE = Memory")
    assert ddl.content == b"" and "x-clickhouse-format" not in ddl.headers
    inserted = post(ch, "INSERT INTO fmt_ddl FORMAT CSV\n1\n2\n")
    assert json.loads(inserted.headers["x-clickhouse-summary"])["written_rows"] == "2"


def test_response_compression_when_asked(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    sql = "SELECT number FROM numbers(1000)"
    expected = "".join(f"{i}\n" for i in range(1000)).encode()
    plain = post(ch, sql, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers  # not asked with enable_http_compression=1
    asked = {"enable_http_compression": "1"}
    gz = post(ch, sql, params=asked, headers={"Accept-Encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip" and gz.content == expected  # httpx decodes gzip
    for codec, decode in (("lz4", lz4.frame.decompress), ("zstd", zstandard.ZstdDecompressor().decompress)):
        with httpx.stream("POST", f"{ch.url}/", params=asked, content=sql, headers={"Accept-Encoding": codec}) as r:
            raw = b"".join(r.iter_raw())
            assert r.headers["content-encoding"] == codec and decode(raw) == expected
    # clickhouse-connect asks (lz4,zstd,gzip,deflate + enable_http_compression=1) and decodes.
    assert client.query(sql).result_columns[0] == list(range(1000))


# --- errors -------------------------------------------------------------------------------------------


def test_errors_are_clickhouse_shaped(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    cases = {
        "SELECT * FROM no_such_table": (404, "60"),
        "SELEC 1": (400, "62"),
        "SELECT throwIf(1, 'boom')": (500, "395"),
        "": (400, "62"),
        "SELECT 1; SELECT 2": (400, "62"),
    }
    for sql, (status, code) in cases.items():
        response = post(ch, sql)
        assert (response.status_code, response.headers["x-clickhouse-exception-code"]) == (status, code), sql
        assert response.text.startswith(f"Code: {code}. DB::Exception: ") and "Traceback" not in response.text
    with pytest.raises(DatabaseError) as raised:
        client.query("SELECT * FROM no_such_table")
    assert "Unknown table expression identifier 'no_such_table'" in str(raised.value)
    with pytest.raises(DatabaseError, match="boom"):
        client.command("SELECT throwIf(1, 'boom')")
    bad_encoding = post(
        ch, b"\x00garbage", params={"query": "INSERT INTO x FORMAT CSV"}, headers={"Content-Encoding": "zstd"}
    )
    assert bad_encoding.status_code == 500 and "Traceback" not in bad_encoding.text
    assert bad_encoding.headers["x-clickhouse-exception-code"] == "271"
    unknown_codec = post(ch, b"x", headers={"Content-Encoding": "snappy-ish"})
    assert unknown_codec.headers["x-clickhouse-exception-code"] == "1"
    post(ch, "CREATE TABLE typed (x UInt8) ENGINE = Memory").raise_for_status()
    bad_rows = post(ch, "INSERT INTO typed FORMAT CSV\nnot-a-number\n")
    assert bad_rows.status_code == 400 and bad_rows.text.startswith("Code: ")
    with pytest.raises(DatabaseError, match="Cannot parse"):
        client.command("INSERT INTO typed VALUES ('not a number')")
    assert post(ch, "SELECT count() FROM typed").text == "0\n"


# --- concurrency and starvation -----------------------------------------------------------------------


def test_eight_concurrent_clients_insert_and_query(ch: Endpoint, client: clickhouse_connect.driver.Client) -> None:
    _event_table(client, "concurrent_events")
    batches, batch_rows = 10, 2_000

    def worker(n: int) -> int:
        c = ch.client(compress="lz4")
        seen = 0
        for b in range(batches):
            base = (n * batches + b) * batch_rows
            c.insert(
                "concurrent_events",
                [[base + i, f"u{n}", "ab"[i % 2], 1.0] for i in range(batch_rows)],
                column_names=EVENT_COLUMNS,
            )
            seen = c.command(f"SELECT count() FROM concurrent_events WHERE user = 'u{n}'")
            assert c.query("SELECT 1 AS one").result_rows == [(1,)]
        c.close()
        return seen

    with ThreadPoolExecutor(8) as pool:
        per_worker = list(pool.map(worker, range(8)))
    assert per_worker == [batches * batch_rows] * 8
    total = 8 * batches * batch_rows
    assert client.query("SELECT count(), uniqExact(id), sum(id) FROM concurrent_events").result_rows == [
        (total, total, total * (total - 1) // 2)
    ]

    async def async_readers() -> list[int]:
        clients = [await ch.async_client() for _ in range(8)]
        try:
            return list(await asyncio.gather(*(c.command("SELECT count() FROM concurrent_events") for c in clients)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    assert asyncio.run(async_readers()) == [total] * 8


def test_insert_throughput_floor(ch: Endpoint) -> None:
    """The stream workers need ~50k rows/s in batches of thousands; 10k-row, 15-column lz4 inserts."""
    c = ch.client(compress="lz4")
    c.command(
        "CREATE TABLE throughput (event_id UUID, ts DateTime64(3, 'UTC'), received DateTime64(3, 'UTC'), "
        "experiment LowCardinality(String), variant LowCardinality(String), user_id String, session String, "
        "event LowCardinality(String), value Float64, revenue Float64, platform LowCardinality(String), "
        "country LowCardinality(String), props String, seq UInt64, flags UInt8) ENGINE = MergeTree ORDER BY ts"
    )
    n, batches = 10_000, 8
    now = datetime.now(UTC)
    columns = [
        [uuid.uuid4() for _ in range(n)],
        [now] * n,
        [now] * n,
        ["exp"] * n,
        ["ab"[i % 2] for i in range(n)],
        [f"user{i % 5000}" for i in range(n)],
        [f"s{i % 900}" for i in range(n)],
        ["click"] * n,
        [float(i) for i in range(n)],
        [0.5] * n,
        ["web"] * n,
        ["DE"] * n,
        ['{"k":"v"}'] * n,
        list(range(n)),
        [1] * n,
    ]
    context = c.create_insert_context("throughput", data=columns, column_oriented=True)
    started = time.perf_counter()
    for _ in range(batches):
        context.data = columns
        c.insert(context=context)
    rows_per_s = n * batches / (time.perf_counter() - started)
    assert c.command("SELECT count() FROM throughput") == n * batches
    c.close()
    print(f"insert throughput: {rows_per_s:,.0f} rows/s (10k rows x 15 columns, lz4, client encoding included)")
    assert rows_per_s > 50_000


def test_slow_query_does_not_starve_pings_or_other_queries(ch: Endpoint) -> None:
    slow = threading.Thread(target=post, args=(ch, "SELECT sleep(2)"))
    slow.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert httpx.get(f"{ch.url}/ping", timeout=5).text == "Ok.\n"
    assert post(ch, "SELECT 1").text == "1\n"
    assert time.perf_counter() - started < 1.0
    slow.join()


# --- durability, one owner per directory, CLI help ----------------------------------------------------


def test_data_survives_restart_and_sigkill(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "endpoint.log"
    started: list[Endpoint] = []
    try:
        started.append(first := start_endpoint(data, log))
        c = first.client()
        _event_table(c, "durable")
        c.insert("durable", [[i, "u", "a", 1.0] for i in range(1000)], column_names=EVENT_COLUMNS)
        c.close()
        # A second process may not open the same directory: it must fail clearly, not corrupt it.
        second = subprocess.run(
            [sys.executable, "-m", MODULE, "--port", str(_free_port()), "--path", str(data)],
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert second.returncode != 0 and b"one process" in second.stderr
        assert first.stop(signal.SIGTERM) == 0

        started.append(restarted := start_endpoint(data, log))
        c = restarted.client()
        assert c.command("SELECT count() FROM durable") == 1000
        c.insert("durable", [[1000 + i, "u", "b", 1.0] for i in range(500)], column_names=EVENT_COLUMNS)
        c.close()
        restarted.stop(signal.SIGKILL)  # kill -9: no shutdown code runs

        started.append(after_kill := start_endpoint(data, log))
        c = after_kill.client()
        assert c.query("SELECT count(), countIf(variant = 'b') FROM durable").result_rows == [(1500, 500)]
        c.close()
        assert after_kill.stop() == 0
    finally:
        for endpoint in started:
            if endpoint.proc.poll() is None:
                endpoint.stop(signal.SIGKILL)


def test_help_says_development_component() -> None:
    out = subprocess.run([sys.executable, "-m", MODULE, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    text = " ".join(out.stdout.split()).lower()
    assert out.returncode == 0
    assert "development and test component" in text
    assert "production points clickhouse_url at a clickhouse server" in text


def test_sql_heads_are_cut_where_clickhouse_cuts_them() -> None:
    """Only the statement is tokenised: the data after `FORMAT name` (one newline skipped) is raw."""
    split = split_insert(b"INSERT INTO db.t (a, `format`) SETTINGS x = 'FORMAT ;' FORMAT Native\n\x00\x01")
    assert split is not None and split.fmt == "Native"
    assert split.statement == "INSERT INTO db.t (a, `format`) SETTINGS x = 'FORMAT ;'"
    assert split.data_offset == len(b"INSERT INTO db.t (a, `format`) SETTINGS x = 'FORMAT ;' FORMAT Native\n")
    named_format = split_insert(b"insert into format format CSV  \r\n1,2\n")
    assert named_format is not None and named_format.fmt == "CSV" and named_format.statement == "insert into format"
    assert split_insert(b"INSERT INTO t VALUES (1, 'FORMAT CSV')") is None
    assert split_insert(b"INSERT INTO t SELECT * FROM s") is None
    assert split_insert(b"SELECT 1 FORMAT CSV") is None
    assert output_format(b"SELECT 1 FORMAT JSONEachRow") == "JSONEachRow"
    assert output_format(b"SELECT 1 FORMAT CSV SETTINGS max_threads = 1;") == "CSV"
    assert output_format(b"SELECT format FROM t") is None
    assert output_format(b"SELECT * FROM format(JSONEachRow, '{}') -- FORMAT JSON") is None
    assert output_format(b"SELECT 'FORMAT JSON' AS s") is None


# --- off loopback: CLICKHOUSE_URL's credentials, or no start --------------------------------------------

USER = "abstream"
PASSWORD = "pa:ss@w%rd"  # characters that must be percent-encoded in CLICKHOUSE_URL


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine off loopback (`hostname -I`) that can be bound, if any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for candidate in out.split():
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.version != 4 or address.is_loopback:
            continue
        try:
            with socket.socket() as sock:
                sock.bind((candidate, 0))
        except OSError:
            continue
        return candidate
    return None


def _is_authentication_failure(response: httpx.Response, user: str) -> bool:
    return (
        response.status_code == 403  # ClickHouse's exceptionCodeToHTTPStatus for AUTHENTICATION_FAILED
        and response.headers["x-clickhouse-exception-code"] == "516"
        and response.text.startswith(f"Code: 516. DB::Exception: {user}: Authentication failed")
        and "(AUTHENTICATION_FAILED)" in response.text
        and PASSWORD not in response.text
    )


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "192.0.2.2", "fd00::2", "example.com", "::ffff:127.0.0.1"):
        assert not is_loopback(host), host


def test_off_loopback_requires_clickhouse_url_credentials(tmp_path: Path) -> None:
    host = _non_loopback_address()
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind")
    url = f"http://{USER}:{quote(PASSWORD, safe='')}@{host}:8123"
    endpoint = start_endpoint(tmp_path / "data", tmp_path / "endpoint.log", host=host, env={"CLICKHOUSE_URL": url})
    try:

        def query(**kwargs: Any) -> httpx.Response:
            return httpx.post(f"{endpoint.url}/", content=b"SELECT 1", timeout=30, **kwargs)

        assert httpx.get(f"{endpoint.url}/ping", timeout=5).text == "Ok.\n"  # health checks need no credentials
        # today's dev/test client (default, no password) and wrong credentials, whichever way they come
        assert _is_authentication_failure(query(), "default")
        assert _is_authentication_failure(query(auth=(USER, "wrong")), USER)
        assert _is_authentication_failure(query(auth=("default", PASSWORD)), "default")
        assert _is_authentication_failure(query(headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": "x"}), USER)
        assert _is_authentication_failure(query(params={"user": USER, "password": PASSWORD[:-1]}), USER)
        mixed = query(headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": PASSWORD}, params={"user": USER})
        assert mixed.status_code == 403 and "AUTHENTICATION_FAILED" in mixed.text
        bearer = query(headers={"Authorization": "Bearer abc"})
        assert bearer.status_code == 403 and "scheme is not supported" in bearer.text
        with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
            endpoint.client(username=USER, password="wrong")

        # the right user and password, each way ClickHouse reads them
        assert query(auth=(USER, PASSWORD)).text == "1\n"
        assert query(headers={"X-ClickHouse-User": USER, "X-ClickHouse-Key": PASSWORD}).text == "1\n"
        assert query(params={"user": USER, "password": PASSWORD}).text == "1\n"
        client = endpoint.client(username=USER, password=PASSWORD)  # HTTP Basic, as every abstream process sends
        _event_table(client, "guarded")
        client.insert("guarded", [[1, "u", "a", 1.0]], column_names=EVENT_COLUMNS)
        assert client.command("SELECT count() FROM guarded") == 1
        client.close()
    finally:
        code = endpoint.stop()
    assert code == 0, endpoint.log.read_text()[-2000:]
    assert f"user '{USER}'" in endpoint.log.read_text() and PASSWORD not in endpoint.log.read_text()


@pytest.mark.parametrize("command", [["-m", MODULE], ["-m", "abstream.cli", "clickhouse-local"]])
def test_off_loopback_without_password_refuses_to_start(tmp_path: Path, command: list[str]) -> None:
    """Refused before anything is opened or bound, whatever the address: no need for a real interface."""
    data = tmp_path / "data"
    env = {**os.environ, "CLICKHOUSE_URL": "http://default:@127.0.0.1:8123"}
    out = subprocess.run(
        [sys.executable, *command, "--host", "0.0.0.0", "--port", str(_free_port()), "--path", str(data)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CLICKHOUSE_URL" in lines[0] and "0.0.0.0" in lines[0], out.stderr
    assert not data.exists()
