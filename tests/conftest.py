"""Fixtures that give any test a running stack (see tests/stack.py for how it is chosen)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from abstream.config import Settings
from tests.stack import Infra, choose_mode, isolated_settings, start_infra

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
