"""Fixtures that give any test a running stack (see tests/stack.py for how it is chosen)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from abstream.config import Settings
from tests.stack import Infra, app_process, choose_mode, isolated_settings, log_dir, start_infra

_MODE = choose_mode()


def pytest_report_header(config: pytest.Config) -> str:
    return f"abstream test stack: {_MODE} (Kafka + ClickHouse)"


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    stack = start_infra(_MODE)
    print(f"\nabstream test stack: {stack.mode}: kafka={stack.kafka_bootstrap} clickhouse={stack.clickhouse_url}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def settings(infra: Infra) -> Iterator[Settings]:
    """Settings isolated to this test: own topic prefix, own database (dropped afterwards)."""
    s = isolated_settings(infra)
    yield s
    from abstream.clickhouse import client

    try:
        c = client(s, database=None)
        c.command(f"DROP DATABASE IF EXISTS `{s.clickhouse_database}`")
        c.close()
    except Exception:  # noqa: BLE001 - best-effort cleanup
        pass


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """A migrated database, a gateway and one worker: (settings, the gateway's base URL)."""
    from abstream.migrate import migrate

    migrate(settings, log=False)
    with app_process("gateway", settings, log_dir()) as gw, app_process("worker", settings, log_dir()):
        yield settings, gw.address
