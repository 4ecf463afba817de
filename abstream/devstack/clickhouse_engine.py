"""The chDB engine of this process and its connections (``Slot``), each with the state put on it tracked
(current database, settings), so a request's URL settings apply to that request only and a session's SET/USE
persist for that session only.

chDB runs the ClickHouse engine in-process and only ONE process may open a data directory: ``Engine`` opens
(and so locks) it first. Connections to one path run in parallel; one connection is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from typing import Any

from chdb import _chdb  # the engine binding chdb.connect() wraps; it also exposes classify_query

from abstream.devstack.clickhouse_errors import ClickHouseError


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
