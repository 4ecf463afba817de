"""The test harness: which Kafka and ClickHouse the suite talks to, and the app processes it starts.

Chosen once per session, in this order:
1. existing services named by ABSTREAM_TEST_KAFKA and ABSTREAM_TEST_CLICKHOUSE_URL;
2. testcontainers (Apache Kafka, ClickHouse server) when a Docker engine answers;
3. the embedded stack: `abstream broker` (tansu) and `abstream clickhouse-local` (chDB) on free ports.
Each test that needs isolation gets its own topic prefix and database (see ``Isolated``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.devstack.ports import free_port
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy

UNDER_LOAD = pytest.mark.xdist_group("under_load")
"""Tests that drive sustained load or kill processes under it. ``scripts/test`` runs the suite in two
processes (pytest-xdist, ``--dist loadgroup``); these run one after the other in one of them, so no two of
them compete for the 2 cores a CI machine has, while the rest of the suite is shared by both."""


@dataclass
class Infra:
    mode: str
    kafka_bootstrap: str
    clickhouse_url: str
    embedded: bool
    children: list[Child] = field(default_factory=list)
    data_dir: Path | None = None
    _containers: list[object] = field(default_factory=list)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for container in reversed(self._containers):
            container.stop()  # type: ignore[attr-defined]
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no package: all mean "no Docker"
        return False


def choose_mode() -> str:
    if os.environ.get("ABSTREAM_TEST_KAFKA") and os.environ.get("ABSTREAM_TEST_CLICKHOUSE_URL"):
        return "external"
    if docker_answers():
        return "testcontainers"
    return "embedded"


def start_infra(mode: str) -> Infra:
    if mode == "external":
        return Infra(mode, os.environ["ABSTREAM_TEST_KAFKA"], os.environ["ABSTREAM_TEST_CLICKHOUSE_URL"], False)
    if mode == "testcontainers":
        from testcontainers.clickhouse import ClickHouseContainer
        from testcontainers.kafka import KafkaContainer

        kafka = KafkaContainer().with_kraft()
        kafka.start()
        ch = ClickHouseContainer(port=8123, username="abstream", password="abstream")  # noqa: S106 - throwaway
        ch.start()
        url = f"http://abstream:abstream@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
        return Infra(mode, kafka.get_bootstrap_server(), url, False, _containers=[kafka, ch])
    data_dir = Path(tempfile.mkdtemp(prefix="abstream-test-"))
    broker_port, ch_port = free_port(), free_port()
    infra = Infra(
        mode,
        f"127.0.0.1:{broker_port}",
        f"http://default:@127.0.0.1:{ch_port}",
        True,
        data_dir=data_dir,
    )
    settings = Settings.from_env(broker_port=broker_port, clickhouse_port=ch_port, data_dir=str(data_dir))
    from abstream.devstack.supervisor import stack_children

    infra.children, _ = stack_children(settings, workers=0, log_dir=data_dir)
    for child in infra.children:
        child.start({})
    try:
        for child in infra.children:
            wait_healthy(child, 60)
    except BaseException:
        infra.stop()
        raise
    return infra


def isolated_settings(infra: Infra, **overrides: object) -> Settings:
    """Settings with a unique topic prefix and database, so no state leaks between tests."""
    tag = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "kafka_bootstrap_servers": infra.kafka_bootstrap,
        "clickhouse_url": infra.clickhouse_url,
        "clickhouse_database": f"t_{tag}",
        "kafka_topic_prefix": f"t{tag}.",
        "admin_token": "",
        "log_level": os.environ.get("ABSTREAM_TEST_LOG_LEVEL", "WARNING"),
        # worker state (Faust's data dir) under the stack's temp dir, never the repository's .abstream-data
        "data_dir": str((infra.data_dir or Path(tempfile.gettempdir())) / f"abstream-test-{tag}"),
    }
    values.update(overrides)
    return Settings.from_env(**values)


_APPS = {
    # kind: (port flag, health path)
    "gateway": ("--port", "/health/ready"),
    "worker": ("--web-port", "/health"),
}


def start_app(kind: str, settings: Settings, logs: Path, name: str | None = None, timeout: float = 60) -> Child:
    """Start `abstream gateway` or `abstream worker` with ``settings`` on a free port; return once healthy."""
    flag, health = _APPS[kind]
    port = free_port()
    name = name or kind
    child = Child(
        name,
        abstream_argv(kind, flag, str(port)),
        f"http://127.0.0.1:{port}",
        lambda: http_ok(f"http://127.0.0.1:{port}{health}"),
        log_path=logs / f"{name}-{port}.log",
    )
    child.start(settings.as_env())
    try:
        wait_healthy(child, timeout)
    except BaseException:
        child.stop()
        raise
    return child


@contextmanager
def app_process(kind: str, settings: Settings, logs: Path, timeout: float = 60) -> Iterator[Child]:
    """Run `abstream gateway` or `abstream worker` with ``settings`` until the block ends."""
    child = start_app(kind, settings, logs, timeout=timeout)
    try:
        yield child
    finally:
        child.stop()


def log_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "abstream-test-logs"
    path.mkdir(exist_ok=True)
    return path


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail naming ``what`` and the last answer."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def rows(settings: Settings, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one parameterised query, on a client of its own."""
    c = ch_client(settings)
    try:
        return list(c.query(sql, parameters=params).result_rows)
    finally:
        c.close()


def scalar(settings: Settings, sql: str, **params: Any) -> Any:
    """The first value of the first row of one parameterised query."""
    return rows(settings, sql, **params)[0][0]
