"""`abstream gateway` with ABSTREAM_GATEWAY_WORKERS=2: connections spread over both server processes (each has
its own SO_REUSEPORT socket), a killed server process is replaced, and stopping the supervisor stops them all."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from abstream.config import Settings
from abstream.devstack.ports import free_port
from abstream.devstack.supervisor import Child
from tests.stack import app_process, log_dir

CONNECTIONS = 32


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _established_per_process(pids: list[int], port: int) -> dict[int, int]:
    """ESTABLISHED server-side connections on ``port`` held by each pid (from /proc: socket inodes)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":
                    inodes.add(fields[9])
    counts = {}
    for pid in pids:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts[pid] = n
    return counts


def _body(user: str) -> dict[str, object]:
    now = datetime.now(UTC).isoformat()
    return {
        "anonymous_user_id": user,
        "events": [{"event_name": "screen_viewed", "occurred_at": now, "event_id": uuid.uuid4().hex} for _ in range(3)],
    }


@pytest.fixture
def two_process_gateway(settings: Settings) -> Iterator[tuple[Child, int]]:
    s = dataclasses.replace(settings, gateway_workers=2)
    with app_process("gateway", s, log_dir()) as gw:
        yield gw, int(gw.address.rsplit(":", 1)[1])


def test_connections_spread_over_both_server_processes(two_process_gateway: tuple[Child, int]) -> None:
    gw, port = two_process_gateway
    assert gw.proc is not None
    servers = _children(gw.proc.pid)
    assert len(servers) == 2, f"expected 2 server processes under the supervisor, found {servers}"
    clients = [httpx.Client(base_url=gw.address, timeout=10) for _ in range(CONNECTIONS)]
    try:

        def post(client: httpx.Client) -> int:
            r = client.post("/v1/events", json=_body(f"u-{uuid.uuid4().hex[:8]}"))
            assert r.status_code == 200, r.text
            return int(r.json()["accepted"])

        with ThreadPoolExecutor(CONNECTIONS) as pool:  # every client opens its connection at the same moment
            assert sum(pool.map(post, clients)) == 3 * CONNECTIONS
        counts = _established_per_process(servers, port)
        assert sum(counts.values()) == CONNECTIONS, counts
        # the kernel hashes connections over the two sockets: fewer than 4 of 32 on one is a 1-in-400,000 event
        assert min(counts.values()) >= 4, f"connections per server process: {counts}"
    finally:
        for client in clients:
            client.close()


def test_killed_server_process_is_replaced_and_stop_leaves_nothing(two_process_gateway: tuple[Child, int]) -> None:
    gw, port = two_process_gateway
    assert gw.proc is not None
    supervisor = gw.proc.pid
    before = _children(supervisor)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    after: list[int] = []
    while time.monotonic() < deadline:
        after = _children(supervisor)
        if len(after) == 2 and before[0] not in after:
            break
        time.sleep(0.2)
    assert len(after) == 2 and before[0] not in after, f"not replaced: before {before}, now {after}"
    with httpx.Client(base_url=gw.address, timeout=10) as client:
        while time.monotonic() < deadline and client.get("/health/ready").status_code != 200:
            time.sleep(0.2)
        for _ in range(20):  # new connections: whichever server process the kernel picks answers
            r = httpx.post(f"{gw.address}/v1/events", json=_body("u-after-kill"), timeout=10)
            assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    gw.stop()
    time.sleep(0.5)
    alive = [pid for pid in after if Path(f"/proc/{pid}").exists() and b"Z" not in _state(pid)]
    assert alive == [], f"server processes left after the supervisor stopped: {alive}"
    with socket.socket() as probe:  # and nothing listens on the port any more (TIME_WAIT leftovers aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"


def test_busy_port_is_one_clear_line(settings: Settings) -> None:
    import subprocess
    import sys

    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        env = {**os.environ, **dataclasses.replace(settings, gateway_workers=2, gateway_port=port).as_env()}
        done = subprocess.run(
            [sys.executable, "-m", "abstream.cli", "gateway"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr, done.stderr


def test_server_processes_that_cannot_start_stop_the_supervisor(settings: Settings, tmp_path: Path) -> None:
    """A malformed tests.json kills every server process at start: exit 1 with the reason, not a restart loop."""
    import subprocess
    import sys

    manifest = tmp_path / "tests.json"
    manifest.write_text('{"experiments": [{"name": 3}]}')
    env = {
        **os.environ,
        **dataclasses.replace(
            settings, gateway_workers=2, gateway_port=free_port(), manifest_path=str(manifest), log_level="INFO"
        ).as_env(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "abstream.cli", "gateway"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "giving up" in done.stderr and "experiments" in done.stderr, done.stderr[-2000:]
