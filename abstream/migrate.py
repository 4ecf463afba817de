"""`abstream migrate`: apply the ordered SQL files in clickhouse/ once each.

Each file ``NNNN_name.sql`` may hold several statements separated by ``;``. Applied files are recorded
with their checksum in ``schema_migrations``; re-running is a no-op, an applied file that changed is an
error (write a new migration instead), and a failing statement stops with the file name and the
server's message. Works the same against the embedded endpoint and a ClickHouse server.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from abstream.clickhouse import connect_args, describe_failure
from abstream.config import Settings

_MIGRATION_NAME = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """A migration could not be applied; the message names the file and the server's error."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def split_statements(sql: str) -> list[str]:
    """Split on ``;`` outside quotes and comments (enough for DDL files written by us)."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    quote: str | None = None
    while i < n:
        ch = sql[i]
        if quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < n:
                buf.append(sql[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            buf.append(ch)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        elif ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
        else:
            buf.append(ch)
        i += 1
    tail = "".join(buf).strip()
    if tail:
        out.append(tail)
    return out


def load_migrations(directory: str | Path) -> list[Migration]:
    path = Path(directory)
    if not path.is_dir():
        raise MigrationError(f"migrations directory {path} does not exist (ABSTREAM_MIGRATIONS_DIR)")
    files = sorted(p for p in path.iterdir() if p.suffix == ".sql")
    bad = [p.name for p in files if not _MIGRATION_NAME.match(p.name)]
    if bad:
        raise MigrationError(f"migration file names must look like 0001_name.sql: {', '.join(bad)}")
    return [Migration(p.name, p.read_text(encoding="utf-8")) for p in files]


def _bootstrap(settings: Settings) -> Client:
    admin = clickhouse_connect.get_client(**connect_args(settings, database=None))
    # Identifiers cannot be bound as parameters; the name is checked before it is quoted.
    db = settings.clickhouse_database
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", db):
        raise MigrationError(f"CLICKHOUSE_DATABASE {db!r} is not a plain identifier")
    admin.command(f"CREATE DATABASE IF NOT EXISTS `{db}`")
    admin.close()
    client = clickhouse_connect.get_client(**connect_args(settings))
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY name"
    )
    return client


def migrate(settings: Settings, log: bool = True) -> list[str]:
    """Apply pending migrations in order; return the names applied in this run."""
    migrations = load_migrations(settings.migrations_path)
    try:
        client = _bootstrap(settings)
    except ClickHouseError as exc:
        raise MigrationError(describe_failure(settings, exc)) from exc
    applied = {row[0]: row[1] for row in client.query("SELECT name, checksum FROM schema_migrations").result_rows}
    done: list[str] = []
    for migration in migrations:
        if migration.name in applied:
            if applied[migration.name] != migration.checksum:
                raise MigrationError(
                    f"{migration.name} was applied before and has changed since; add a new migration instead"
                )
            continue
        for number, statement in enumerate(migration.statements(), start=1):
            try:
                client.command(statement)
            except ClickHouseError as exc:
                raise MigrationError(f"{migration.name} (statement {number}) failed: {exc}") from exc
        client.insert("schema_migrations", [[migration.name, migration.checksum]], column_names=["name", "checksum"])
        done.append(migration.name)
        if log:
            print(f"applied {migration.name}", flush=True)
    client.close()
    return done
