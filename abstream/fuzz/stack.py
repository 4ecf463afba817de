"""The fuzz run's private stack: embedded broker (tansu), ClickHouse endpoint (chDB), migrations, one worker and a
gateway, on free ports, with admin and metrics tokens of its own. Everything is stopped when the block ends.

Why ClickHouse too (the benchmarks' stack has none): without it the read endpoints (results, /v1/metrics/*) only
ever answer 503, so their parameter handling and their statistics over real rollups would go unfuzzed; with it they
answer 200 on the migrated (empty, then fuzzed) tables. The worker writes what the fuzzing and the hostile checks
send, so the hostile checks can prove in ``event_logs`` that a refused request left nothing behind.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from abstream.bench.stack import stop_on_sigterm
from abstream.config import Settings
from abstream.fuzz.target import Target

START_TIMEOUT_S = 90


@contextlib.contextmanager
def private_stack(worker: bool = True, keep_dir: bool = False) -> Iterator[Target]:
    """Broker, ClickHouse, migrations, (a worker,) a gateway: the Target to fuzz, stopped at the end."""
    from abstream.devstack.ports import free_port
    from abstream.devstack.supervisor import stack_children, wait_healthy
    from abstream.migrate import migrate

    work_dir = Path(tempfile.mkdtemp(prefix="abstream-fuzz-stack-"))
    host = "127.0.0.1"
    broker_port, ch_port = free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap_servers=f"{host}:{broker_port}",
        broker_port=broker_port,
        clickhouse_port=ch_port,
        clickhouse_url=f"http://default:@{host}:{ch_port}",
        gateway_host=host,
        gateway_port=free_port(),
        worker_web_port=free_port(),
        kafka_topic_prefix=f"fuzz{uuid.uuid4().hex[:8]}.",
        admin_token=secrets.token_urlsafe(16),
        metrics_token=secrets.token_urlsafe(16),
        log_level="WARNING",
        data_dir=str(work_dir),
        gateway_workers=1,
    )
    infra, apps = stack_children(settings, workers=1 if worker else 0, log_dir=work_dir)
    children = [*infra, *apps]
    started = []
    ok = False
    with stop_on_sigterm():
        try:
            for child in infra:
                child.start(settings.as_env())
                started.append(child)
            for child in infra:
                wait_healthy(child, START_TIMEOUT_S)
            migrate(settings, log=False)
            for child in apps:
                child.start(settings.as_env())
                started.append(child)
            for child in apps:
                wait_healthy(child, START_TIMEOUT_S)
            yield Target(
                f"http://{host}:{settings.gateway_port}", settings.admin_token, settings.metrics_token, settings
            )
            ok = True
        finally:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                for child in reversed(started):
                    child.stop()
            finally:
                signal.signal(signal.SIGINT, old_int)
            if ok and not keep_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
            else:
                print(f"(logs of the fuzz stack kept in {work_dir}: {', '.join(c.name for c in children)})",
                      file=sys.stderr)  # fmt: skip
