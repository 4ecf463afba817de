"""The Faust app: settings tuned for both tansu and Kafka, and its health page.

The agents are wired onto it by ``stream_workers.agents.build``; ``stream_workers.main`` is the entry point.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import faust
from aiohttp.web import Response

from abstream.config import Settings

log = logging.getLogger(__name__)


class WorkerApp(faust.App):
    """A Faust app that keeps writing while it stops.

    On SIGTERM Faust stops its timers, then waits until every record handed to an agent is acknowledged. The
    agents acknowledge a record once the flush that writes its rows is done, and the flush runs on a timer: so
    a worker stopped with rows buffered waited for its supervisor's SIGKILL (15 s in the test stacks), losing
    nothing (a restart resumes from the ClickHouse checkpoints) but slow. ``flush_while_stopping`` keeps
    flushing until Faust is done waiting; then the records are written, acknowledged and committed.
    """

    flush_while_stopping: Callable[[], Awaitable[None]] | None = None
    flush_interval_s: float = 0.25

    async def on_stop(self) -> None:
        flushing = asyncio.ensure_future(self._keep_flushing()) if self.flush_while_stopping else None
        try:
            await super().on_stop()
        finally:
            if flushing is not None:
                flushing.cancel()

    async def _keep_flushing(self) -> None:
        assert self.flush_while_stopping is not None  # noqa: S101 - checked by the caller
        while True:
            try:
                await self.flush_while_stopping()
            except Exception:  # noqa: BLE001 - a failed flush is retried: nothing acknowledged is dropped
                log.exception("flush while stopping failed; retrying")
            await asyncio.sleep(self.flush_interval_s)


def create_app(settings: Settings) -> WorkerApp:
    """A Faust app whose settings keep consumer-group joins fast (seconds, not 30 s) on tansu and Kafka."""
    datadir = Path(settings.data_dir) / "workers"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = WorkerApp(
        f"{settings.kafka_topic_prefix}abstream-workers",
        broker=[f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap_servers.split(",")],
        store="memory://",
        # Faust's default datadir is "<app id>-data" in the working directory; keep it in ours.
        datadir=str(datadir / "{conf.name}"),
        producer_acks=-1,
        producer_compression_type="lz4",
        broker_rebalance_timeout=6,
        broker_session_timeout=10,
        broker_heartbeat_interval=1,
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        topic_allow_declare=True,
        web_port=settings.worker_web_port,
        web_host="127.0.0.1",
        web_in_thread=False,
    )
    app.flush_interval_s = min(settings.worker_flush_interval_s, 0.25)  # while stopping: no long timer waits

    @app.page("/health")
    async def health(web: object, request: object) -> Response:
        return Response(text='{"status":"live"}', content_type="application/json")

    return app
