"""The Faust app: settings tuned for both tansu and Kafka, and its health page.

The agents are wired onto it by ``stream_workers.agents.build``; ``stream_workers.main`` is the entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faust
from aiohttp.web import Response

from abstream.config import Settings

log = logging.getLogger(__name__)


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
