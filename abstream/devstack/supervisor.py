"""`abstream dev`: the embedded default. Starts every component as a child process, waits until each is
healthy, prints where it listens, and on Ctrl-C (or SIGTERM) stops all of them, leaving nothing behind.

Children run in their own process groups (a whole group is signalled, so grandchildren go too) and get
SIGTERM from the kernel if this supervisor dies without cleaning up (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from abstream.config import Settings
from abstream.devstack.broker import kafka_answers
from abstream.devstack.ports import ensure_port_free, port_open
from abstream.lifetime import die_with_parent

HealthCheck = Callable[[], bool]


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local URL we built
            return 200 <= resp.status < 300
    except OSError:
        return False


@dataclass
class Child:
    """One component of the stack: how to start it and how to tell it is healthy."""

    name: str
    argv: list[str]
    address: str
    health: HealthCheck
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, base_env: dict[str, str]) -> None:
        env = {**os.environ, **base_env, **self.env}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                where = f" (log: {self.log_path})" if self.log_path else ""
                print(f"abstream: {self.name} did not stop within {timeout:.0f} s of SIGTERM; killed{where}",
                      file=sys.stderr)  # fmt: skip
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # anything the child left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_healthy(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            code = child.proc.returncode if child.proc else None
            hint = f"; see {child.log_path}" if child.log_path else ""
            raise RuntimeError(f"{child.name} exited with code {code} before it was healthy{hint}")
        if child.health():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{child.name} was not healthy within {timeout:.0f}s (see {child.log_path})")


def abstream_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "abstream.cli", *args]


def stack_token(settings: Settings, data_dir: Path, name: str = "admin_token") -> str:
    """The configured token (ABSTREAM_ADMIN_TOKEN, or ABSTREAM_METRICS_TOKEN for ``name="metrics_token"``) if set,
    else one generated once and kept in the data directory (created 0600)."""
    configured = getattr(settings, name)
    if configured:
        return str(configured)
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def stack_children(settings: Settings, workers: int, log_dir: Path | None) -> tuple[list[Child], list[Child]]:
    """(infrastructure, application) children of the embedded stack, in start order."""
    host = "127.0.0.1"
    bootstrap = f"{host}:{settings.broker_port}"

    def log(name: str) -> Path | None:
        return log_dir / f"{name}.log" if log_dir else None

    infra = [
        Child(
            "broker",
            abstream_argv("broker", "--port", str(settings.broker_port)),
            f"kafka://{bootstrap} (tansu, in memory)",
            lambda: port_open(host, settings.broker_port) and asyncio.run(kafka_answers(bootstrap)),
            log_path=log("broker"),
        ),
        Child(
            "clickhouse",
            abstream_argv(
                "clickhouse-local",
                "--port",
                str(settings.clickhouse_port),
                "--path",
                str(Path(settings.data_dir) / "clickhouse"),
            ),
            f"http://{host}:{settings.clickhouse_port} (chDB, data in {settings.data_dir}/clickhouse)",
            lambda: http_ok(f"http://{host}:{settings.clickhouse_port}/ping"),
            log_path=log("clickhouse"),
        ),
    ]
    apps: list[Child] = []
    for i in range(workers):
        port = settings.worker_web_port + i
        apps.append(
            Child(
                f"worker-{i + 1}",
                abstream_argv("worker", "--web-port", str(port)),
                f"http://{host}:{port}/health",
                # ready = in its consumer group with partitions positioned: "healthy" then means consuming
                lambda port=port: http_ok(f"http://{host}:{port}/ready"),
                log_path=log(f"worker-{i + 1}"),
            )
        )
    apps.append(
        Child(
            "gateway",
            abstream_argv("gateway", "--port", str(settings.gateway_port)),
            f"http://{host}:{settings.gateway_port}",
            lambda: http_ok(f"http://{host}:{settings.gateway_port}/health/ready"),
            log_path=log("gateway"),
        )
    )
    return infra, apps


def check_ports(settings: Settings, workers: int) -> None:
    host = "127.0.0.1"
    ensure_port_free(host, settings.broker_port, "broker", "--broker-port")
    ensure_port_free(host, settings.clickhouse_port, "ClickHouse endpoint", "--clickhouse-port")
    ensure_port_free(host, settings.gateway_port, "gateway", "--gateway-port")
    for i in range(workers):
        ensure_port_free(host, settings.worker_web_port + i, "worker", "--worker-web-port")


def tools_env(stack: Settings) -> dict[str, str]:
    """What ``abstream verify`` (or ``migrate``) run from another shell must set to reach this stack: the
    stack's Kafka and ClickHouse addresses where they differ from what that shell's environment gives
    (non-default ``--broker-port`` / ``--clickhouse-port``)."""
    shell = Settings.from_env().as_env()
    ours = stack.as_env()
    return {name: ours[name] for name in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL") if ours[name] != shell[name]}


def run_dev(settings: Settings, workers: int = 1) -> int:
    from abstream.migrate import MigrationError, migrate

    check_ports(settings, workers)
    data_dir = Path(settings.data_dir)
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    token = stack_token(settings, data_dir)
    metrics = stack_token(settings, data_dir, "metrics_token")
    child_settings = Settings.from_env(
        kafka_bootstrap_servers=f"127.0.0.1:{settings.broker_port}",
        clickhouse_url=f"http://default:@127.0.0.1:{settings.clickhouse_port}",
        broker_port=settings.broker_port,
        clickhouse_port=settings.clickhouse_port,
        gateway_port=settings.gateway_port,
        worker_web_port=settings.worker_web_port,
        data_dir=str(data_dir),
        admin_token=token,
        metrics_token=metrics,
        gateway_workers=settings.gateway_workers,
    )
    env = child_settings.as_env()
    infra, apps = stack_children(child_settings, workers, log_dir)
    started: list[Child] = []
    stop_requested = False

    def _request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    old_int = signal.signal(signal.SIGINT, _request_stop)
    old_term = signal.signal(signal.SIGTERM, _request_stop)
    t0 = time.monotonic()
    code = 0
    try:
        for child in infra:
            child.start(env)
            started.append(child)
        for child in infra:
            wait_healthy(child, 60)
        migrate(child_settings, log=False)
        for child in apps:
            child.start(env)
            started.append(child)
        for child in apps:
            wait_healthy(child, 90)
        print(f"abstream dev: healthy in {time.monotonic() - t0:.1f}s (Ctrl-C stops everything)")
        for child in started:
            extra = f"  ({child_settings.gateway_workers} server processes)" if child.name == "gateway" else ""
            print(f"  {child.name:<11} {child.address}{extra}")
        print(f"  admin token {token}  (Authorization: Bearer …)")
        print(f"  metrics token {metrics}  (/v1/metrics/daily, /experiments, /funnels)")
        tools = tools_env(child_settings)
        if tools:
            assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in tools.items())
            print(f"  tools       {assignments} abstream verify  (or migrate: other commands need these)")
        print(f"  logs        {log_dir}/")
        sys.stdout.flush()
        while True:
            dead = [c for c in started if not c.alive()]
            if dead:
                names = ", ".join(f"{c.name} (code {c.proc.returncode if c.proc else '?'})" for c in dead)
                print(f"abstream dev: {names} exited; stopping everything (logs in {log_dir})", file=sys.stderr)
                code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, MigrationError) as exc:
        print(f"abstream dev: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(started):
            child.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if stop_requested:
            print("abstream dev: stopped", flush=True)
    return code
