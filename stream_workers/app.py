"""The Faust app: topics, settings tuned for both tansu and Kafka, and the worker entry point.

Agents live in their own modules (enrichment, sink, rollups) and register on ``app`` on import.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from pathlib import Path

import faust
from aiohttp.web import Response

from abstream.config import Settings

log = logging.getLogger(__name__)

GC_THRESHOLDS = (50_000, 50, 100)


def create_app(settings: Settings) -> faust.App:
    """A Faust app whose settings keep consumer-group joins fast (seconds, not 30 s) on tansu and Kafka."""
    datadir = Path(settings.data_dir) / "workers"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
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

    @app.page("/health")
    async def health(web: object, request: object) -> Response:
        return Response(text='{"status":"live"}', content_type="application/json")

    return app


async def _ensure_topics(settings: Settings) -> None:
    """Create the topics (same partition count for events and assignments) before Faust subscribes."""
    from aiokafka.errors import KafkaError

    from abstream.kafka import ensure_topics

    delay = 0.5
    while True:
        try:
            await ensure_topics(settings)
            return
        except (KafkaError, OSError) as exc:
            log.warning("Kafka at %s not reachable yet (%s); retrying", settings.kafka_bootstrap_servers, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def run(settings: Settings, web_port: int | None = None) -> None:
    """`abstream worker`: one Faust worker process (several may run; they share the partitions)."""
    from stream_workers import agents

    port = web_port or settings.worker_web_port
    asyncio.run(_ensure_topics(settings))
    # The worker keeps every buffered row (lists holding the parsed event dicts) alive until it is
    # written, so with Python's default thresholds (700, 10, 10) the collector ran full passes over
    # hundreds of thousands of containers several times a second. Measured on the pipeline alone
    # (200,000 events in 50-event records): 69k events/s with the defaults, 180k with these.
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what start-up allocated is never garbage: keep it out of every collection
    app = agents.build(settings)
    level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level.lower())
    sys.argv = [sys.argv[0], "worker", "--loglevel", level, "--web-port", str(port), "--web-host", "127.0.0.1"]
    app.main()
