"""The benchmarks' private stack: an embedded broker (tansu) and an ``abstream gateway`` process on free ports
with a unique topic prefix. Both are stopped when the block ends, on an error, on Ctrl-C and on SIGTERM (and
they get SIGTERM from the kernel if this process dies without cleaning up)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from abstream.config import Settings


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C inside the block, so ``finally`` clauses stop every child."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class PrivateStack:
    settings: Settings
    gateway_url: str
    work_dir: Path
    children: list[Any] = field(default_factory=list)

    @property
    def gateway_pid(self) -> int:
        return int(self.children[-1].proc.pid)

    def pids(self) -> dict[str, int]:
        return {child.name: int(child.proc.pid) for child in self.children}

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}); see {child.log_path}")


@contextlib.contextmanager
def private_stack(gateway: bool = True, keep_dir: bool = False, gateway_workers: int = 1) -> Iterator[PrivateStack]:
    """A broker and a gateway of our own on free ports; everything is stopped when the block ends.

    ``gateway_workers`` > 1 runs the gateway as in production on several cores: uvicorn server processes
    sharing the port (ABSTREAM_GATEWAY_WORKERS); ``gateway_pid`` is then their parent.

    ClickHouse is deliberately absent (CLICKHOUSE_URL points at a closed port): the gateway never writes it,
    and its registry only tries it, best effort, to restore experiments when the topic is empty.
    """
    from abstream.devstack.broker import broker_command, kafka_answers
    from abstream.devstack.ports import free_port, port_open
    from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy

    work_dir = Path(tempfile.mkdtemp(prefix="abstream-bench-stack-"))
    host = "127.0.0.1"
    broker_port, gateway_port, nowhere = free_port(), free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap_servers=f"{host}:{broker_port}",
        broker_port=broker_port,
        gateway_host=host,
        gateway_port=gateway_port,
        clickhouse_url=f"http://default:@{host}:{nowhere}",
        kafka_topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
        log_level="WARNING",
        admin_token="",
        data_dir=str(work_dir),
        gateway_workers=gateway_workers,
    )
    bootstrap = settings.kafka_bootstrap_servers
    broker = Child(
        "broker",
        broker_command(host, broker_port),
        f"kafka://{bootstrap}",
        lambda: port_open(host, broker_port) and asyncio.run(kafka_answers(bootstrap)),
        log_path=work_dir / "broker.log",
    )
    stack = PrivateStack(settings, f"http://{host}:{gateway_port}", work_dir, [broker])
    ok = False
    with stop_on_sigterm():
        try:
            broker.start({})
            wait_healthy(broker, 30)
            if gateway:
                gw = Child(
                    "gateway",
                    abstream_argv("gateway", "--port", str(gateway_port)),
                    stack.gateway_url,
                    lambda: http_ok(f"{stack.gateway_url}/health/ready"),
                    log_path=work_dir / "gateway.log",
                )
                stack.children.append(gw)
                gw.start(settings.as_env())
                wait_healthy(gw, 60)
            yield stack
            ok = True
        finally:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                for child in reversed(stack.children):
                    child.stop()
            finally:
                signal.signal(signal.SIGINT, old_int)
            if ok and not keep_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
            else:
                for pool in work_dir.glob("*.bin"):  # request pools: large, and rebuilt by every run
                    pool.unlink(missing_ok=True)
                print(f"(logs of the stack kept in {work_dir})", file=sys.stderr)
