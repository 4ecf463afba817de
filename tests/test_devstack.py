"""The embedded stack commands: `abstream broker`, `abstream migrate`, `abstream dev`."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from abstream.config import Settings
from abstream.devstack.ports import free_port, port_open
from abstream.migrate import MigrationError, migrate, split_statements
from tests.stack import Infra

ABSTREAM = [sys.executable, "-m", "abstream.cli"]


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise TimeoutError(port)


def test_broker_command_round_trip_and_clean_stop() -> None:
    port = free_port()
    proc = subprocess.Popen([*ABSTREAM, "broker", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and "broker (tansu" not in line:
            line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line

        async def round_trip() -> list[bytes]:
            bootstrap = f"127.0.0.1:{port}"
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
            await producer.start()
            for i in range(100):
                await producer.send("roundtrip", f"m{i}".encode(), key=b"k")
            await producer.flush()
            await producer.stop()
            consumer = AIOKafkaConsumer(
                "roundtrip", bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
            )
            await consumer.start()
            got: list[bytes] = []
            deadline = time.monotonic() + 15
            while len(got) < 100 and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                got.extend(m.value for msgs in batch.values() for m in msgs)
            await consumer.stop()
            return got

        got = asyncio.run(round_trip())
        assert got == [f"m{i}".encode() for i in range(100)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert not port_open("127.0.0.1", port)


def test_split_statements_ignores_semicolons_in_strings_and_comments() -> None:
    sql = "-- a; comment\nCREATE TABLE a (x String DEFAULT ';');\n/* b; */ SELECT 'it''s;' ; ;"
    assert split_statements(sql) == ["CREATE TABLE a (x String DEFAULT ';')", "SELECT 'it''s;'"]


def test_migrate_applies_once_and_reports_failures(settings: Settings, tmp_path: Path) -> None:
    applied = migrate(settings, log=False)
    assert applied == sorted(p.name for p in settings.migrations_path.glob("*.sql"))
    assert migrate(settings, log=False) == []  # re-running is a no-op

    from abstream.clickhouse import client

    tables = {r[0] for r in client(settings).query("SHOW TABLES").result_rows}
    assert {"event_logs", "assignments", "experiments", "schema_migrations"} <= tables

    bad_dir = tmp_path / "migrations"
    bad_dir.mkdir()
    (bad_dir / "0001_ok.sql").write_text("CREATE TABLE IF NOT EXISTS ok_t (x UInt8) ENGINE = Memory;")
    (bad_dir / "0002_broken.sql").write_text("CREATE TABLE broken (x NoSuchType) ENGINE = Memory;")
    bad = Settings.from_env(**{**_fields(settings), "migrations_dir": str(bad_dir)})
    with pytest.raises(MigrationError) as err:
        migrate(bad, log=False)
    message = str(err.value)
    assert "0002_broken.sql" in message and "NoSuchType" in message
    # the good one was recorded; the broken one was not and is retried next time
    (bad_dir / "0002_broken.sql").write_text("CREATE TABLE IF NOT EXISTS fixed_t (x UInt8) ENGINE = Memory;")
    assert migrate(bad, log=False) == ["0002_broken.sql"]
    (bad_dir / "0001_ok.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="0001_ok.sql was applied before and has changed"):
        migrate(bad, log=False)


def _fields(settings: Settings) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(settings)


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in cmdline or marker.encode() in environ:
            pids.append(int(entry.name))
    return pids


def test_dev_comes_up_healthy_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("broker", "clickhouse", "gateway", "worker")}
    data_dir = tmp_path / "devdata"
    argv = [
        *ABSTREAM, "dev",
        "--broker-port", str(ports["broker"]),
        "--clickhouse-port", str(ports["clickhouse"]),
        "--gateway-port", str(ports["gateway"]),
        "--worker-web-port", str(ports["worker"]),
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    t0 = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if "healthy in" in line or "exited" in line or "abstream dev:" in line and "healthy" not in line:
                break
        assert any("healthy in" in line for line in out), "".join(out)
        assert time.monotonic() - t0 < 60
        for line in proc.stdout:
            out.append(line)
            if line.startswith("  logs"):
                break
        text = "".join(out)
        for port in ports.values():
            assert str(port) in text
            assert port_open("127.0.0.1", port)
        assert "admin token" in text
        assert _pids_with(str(data_dir)), "children should be running"
        # "healthy" includes the worker being in its consumer group with its partitions positioned
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['worker']}/ready", timeout=5) as ready:
            assert ready.status == 200 and b'"ready"' in ready.read()
        # The banner says what another shell needs to reach this stack (ports are not the defaults here),
        # and that command works as printed.
        tools = next(line for line in out if line.startswith("  tools"))
        words = shlex.split(tools.split("  tools", 1)[1].split("(", 1)[0])
        assignments = dict(w.split("=", 1) for w in words if "=" in w)
        assert assignments["CLICKHOUSE_URL"].endswith(f":{ports['clickhouse']}")
        assert assignments["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{ports['broker']}"
        assert words[len(assignments) :] == ["abstream", "verify"]
        verify = subprocess.run(
            [*ABSTREAM, "verify"], env={**env, **assignments}, capture_output=True, text=True, timeout=120
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(out) + rest
    assert "stopped" in rest
    time.sleep(0.5)
    assert _pids_with(str(data_dir)) == []
    for port in ports.values():
        assert not port_open("127.0.0.1", port)


def test_dev_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*ABSTREAM, "dev", "--gateway-port", str(port), "--data-dir", str(tmp_path),
             "--broker-port", str(free_port()), "--clickhouse-port", str(free_port())],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0] and "--gateway-port" in lines[0]


def test_infra_fixture_reports_mode(infra: Infra) -> None:
    assert infra.mode in {"embedded", "testcontainers", "external"}
    host, _, port = infra.kafka_bootstrap.rpartition(":")
    assert port_open(host, int(port))


@pytest.mark.parametrize(("command", "code"), [("verify", 2), ("migrate", 1)])
def test_unreachable_clickhouse_is_one_clear_line_without_the_password(command: str, code: int) -> None:
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env["CLICKHOUSE_URL"] = f"http://alice:s3cret-pw@127.0.0.1:{port}"
    result = subprocess.run([*ABSTREAM, command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"abstream {command}: cannot reach ClickHouse at http://alice@127.0.0.1:{port}")
    assert "Connection refused" in lines[0]
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_config_lists_every_setting_but_no_secret() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(ABSTREAM_ADMIN_TOKEN="tok-s3cret", CLICKHOUSE_URL="http://alice:pw-s3cret@ch.internal:8123")
    result = subprocess.run([*ABSTREAM, "config"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    lines = {line.split("=", 1)[0]: line for line in result.stdout.splitlines()}
    assert "set, not shown" in lines["ABSTREAM_ADMIN_TOKEN"]
    assert lines["CLICKHOUSE_URL"].startswith("CLICKHOUSE_URL=http://alice@ch.internal:8123")
    assert "KAFKA_BOOTSTRAP_SERVERS" in lines and "ABSTREAM_GATEWAY_WORKERS" in lines


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ABSTREAM_KAFKA_COMPRESSION", "brotli", "ABSTREAM_KAFKA_COMPRESSION: 'brotli' is not one of"),
        ("CLICKHOUSE_URL", "http://alice:pw-s3cret@ch.internal:80a", "CLICKHOUSE_URL: expected http(s)://"),
        ("CLICKHOUSE_URL", "ch.internal:8123", "CLICKHOUSE_URL: expected http(s)://"),
        ("ABSTREAM_GATEWAY_WORKERS", "two", "ABSTREAM_GATEWAY_WORKERS: invalid literal"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(variable: str, value: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env[variable] = value
    for command in ("config", "verify"):
        result = subprocess.run([*ABSTREAM, command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"abstream {command}: {expected}"), result.stderr
        assert "s3cret" not in result.stderr


def test_verify_against_a_clickhouse_without_the_schema_says_so_in_one_line(infra: Infra) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    env.update(CLICKHOUSE_URL=infra.clickhouse_url, CLICKHOUSE_DATABASE="no_such_db_for_verify")
    result = subprocess.run([*ABSTREAM, "verify"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "answered with an error" in lines[0] and "abstream migrate" in lines[0], lines[0]
