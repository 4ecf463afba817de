"""The chaos run's private stack: every process its own, on free ports, so the run may kill and restart them.

broker (tansu, advertising the proxy) ← proxy ← gateway, workers;  ClickHouse endpoint (chDB) on a data
directory that outlives its process;  the migrations;  ``workers`` stream workers;  one gateway process.
Everything is stopped when the block ends, on an error and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from abstream.config import Settings
from abstream.devstack.broker import broker_binary, kafka_answers
from abstream.devstack.ports import free_port, port_open
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy

HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0


@dataclass
class ChaosStack:
    settings: Settings
    work_dir: Path
    broker_port: int
    proxy_port: int
    clickhouse_port: int
    gateway_port: int
    children: dict[str, Child] = field(default_factory=dict)
    worker_names: list[str] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    # ------------------------------------------------------------------------------------------ children

    def _child(self, name: str, argv: list[str], address: str, health: object, env: bool = True) -> Child:
        child = Child(name, argv, address, health, log_path=self.work_dir / f"{name}.log")  # type: ignore[arg-type]
        child.start(self.settings.as_env() if env else {})
        self.children[name] = child
        return child

    def start_broker(self) -> None:
        listen, advertised = f"tcp://{HOST}:{self.broker_port}", f"tcp://{HOST}:{self.proxy_port}"
        argv = [broker_binary(), "broker", "--listener-url", listen, "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/"]  # fmt: skip
        self._child("broker", argv, listen, lambda: port_open(HOST, self.broker_port), env=False)
        wait_healthy(self.children["broker"], START_TIMEOUT_S)
        argv = [sys.executable, "-m", "abstream.chaos.proxy", str(self.proxy_port), str(self.broker_port)]
        bootstrap = f"{HOST}:{self.proxy_port}"
        proxy = self._child("proxy", argv, bootstrap, lambda: asyncio.run(kafka_answers(bootstrap)), env=False)
        wait_healthy(proxy, START_TIMEOUT_S)

    def start_clickhouse(self) -> None:
        argv = abstream_argv("clickhouse-local", "--port", str(self.clickhouse_port), "--path",
                             str(self.work_dir / "clickhouse"))  # fmt: skip
        url = f"http://{HOST}:{self.clickhouse_port}"
        wait_healthy(self._child("clickhouse", argv, url, lambda: http_ok(f"{url}/ping")), START_TIMEOUT_S)

    def start_gateway(self) -> None:
        argv = abstream_argv("gateway", "--port", str(self.gateway_port))
        url = self.gateway_url
        wait_healthy(self._child("gateway", argv, url, lambda: http_ok(f"{url}/health/ready")), START_TIMEOUT_S)

    def start_worker(self, name: str) -> None:
        port = free_port()
        url = f"http://{HOST}:{port}"
        argv = abstream_argv("worker", "--web-port", str(port))
        wait_healthy(self._child(name, argv, url, lambda: http_ok(f"{url}/health")), START_TIMEOUT_S)

    # ---------------------------------------------------------------------------------------------- faults

    def sigkill(self, name: str) -> None:
        """SIGKILL the child's whole process group (no cleanup of any kind runs)."""
        proc = self.children[name].proc
        assert proc is not None  # noqa: S101 - started children have a process
        with contextlib.suppress(ProcessLookupError):
            import os

            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, name: str) -> None:
        self.children[name].stop()

    def signal_proxy(self, cut: bool) -> None:
        proc = self.children["proxy"].proc
        assert proc is not None  # noqa: S101
        proc.send_signal(signal.SIGUSR1 if cut else signal.SIGUSR2)

    def check_alive(self) -> list[str]:
        """Names of children that died on their own (not killed by the schedule)."""
        return [name for name, child in self.children.items() if not child.alive()]

    def close(self) -> None:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in reversed(list(self.children.values())):
                child.stop()
        finally:
            signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def chaos_stack(workers: int = 1, keep_dir: bool = False) -> Iterator[ChaosStack]:
    from abstream.migrate import migrate

    work_dir = Path(tempfile.mkdtemp(prefix="abstream-chaos-"))
    broker_port, proxy_port, ch_port, gw_port = free_port(), free_port(), free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap_servers=f"{HOST}:{proxy_port}",
        clickhouse_url=f"http://default:@{HOST}:{ch_port}",
        clickhouse_database="abstream",
        kafka_topic_prefix=f"chaos{uuid.uuid4().hex[:6]}.",
        gateway_host=HOST,
        gateway_port=gw_port,
        gateway_workers=1,
        admin_token=secrets.token_urlsafe(16),
        metrics_token=secrets.token_urlsafe(16),
        data_dir=str(work_dir),
        log_level="WARNING",
    )
    stack = ChaosStack(settings, work_dir, broker_port, proxy_port, ch_port, gw_port)
    ok = False
    try:
        stack.start_broker()
        stack.start_clickhouse()
        migrate(settings, log=False)
        stack.start_gateway()
        for i in range(workers):
            name = f"worker-{i + 1}"
            stack.worker_names.append(name)
            stack.start_worker(name)
        yield stack
        ok = True
    finally:
        stack.close()
        if ok and not keep_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"(the chaos stack's logs are kept in {work_dir})", file=sys.stderr)
