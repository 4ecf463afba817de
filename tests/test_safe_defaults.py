"""Safe defaults, started as a user would start the commands: no open admin endpoints off loopback, no user id in
clear in the rejected-events table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.auth import is_loopback
from stream_workers.agents import mask_user_ids


def test_the_gateway_refuses_to_listen_off_loopback_without_an_admin_token() -> None:
    env = {"ABSTREAM_ADMIN_TOKEN": "", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "abstream.cli", "gateway", "--host", "0.0.0.0", "--port", "1"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert "ABSTREAM_ADMIN_TOKEN" in line and "0.0.0.0" in line


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "raw",
    [
        '{"anonymous_user_id": "user-1234567890", "events": [{"event_name": "bad name!"}]}',
        '{"user_id":"user-1234567890","event_type":"x"}',
        '{"user_id": "user-1234567890\\"quoted", "x": 1}',
        '{"anonymous_user_id": "user-1234567890',  # a body cut inside the id
        '{"user_id": 4815162342}',
    ],
)
def test_rejected_bodies_keep_no_user_id_in_clear(raw: str) -> None:
    masked = mask_user_ids(raw)
    assert "1234567890" not in masked and "4815162342" not in masked
    assert "sha256:" in masked
    assert mask_user_ids(raw) == masked, "the same id always hashes alike: one user's rejections group together"
    if "bad name!" in raw:
        assert "bad name!" in masked, "the rest of the body stays as sent"
