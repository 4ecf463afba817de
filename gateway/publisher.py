"""The gateway's Kafka producer: connects in the background, publishes, and says when Kafka is down.

The gateway answers 2xx for an event only after Kafka acknowledged it (acks=all). When the broker is
unreachable or slower than ABSTREAM_PRODUCE_TIMEOUT_S, ``publish`` raises ``KafkaUnavailable`` and
the route answers 503 with Retry-After; the producer keeps reconnecting, so ingestion resumes
without a gateway restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from abstream.config import Settings
from abstream.kafka import ensure_topics, producer_settings

log = logging.getLogger(__name__)

Message = tuple[str, bytes | None, bytes]  # (topic, key, value)


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; nothing of the request may be reported as accepted."""


class Publisher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        """Return at once; connect (and create topics) in the background, retrying with backoff."""
        self._connect_task = asyncio.create_task(self._connect_loop(), name="kafka-connect")

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _connect_loop(self) -> None:
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(**producer_settings(self.settings))
            try:
                await ensure_topics(self.settings)
                await producer.start()
            except (KafkaError, OSError) as exc:
                log.warning("Kafka at %s not reachable yet (%s); retrying", self.settings.kafka_bootstrap_servers, exc)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._producer = producer
            self._ready.set()
            log.info("connected to Kafka at %s", self.settings.kafka_bootstrap_servers)
            return

    async def publish(self, messages: Sequence[Message], return_metadata: bool = False) -> list[RecordMetadata]:
        """Send every message and wait until Kafka acknowledged all of them, or raise KafkaUnavailable."""
        producer = self._producer
        if producer is None:
            raise KafkaUnavailable("not connected to Kafka yet")
        try:
            async with asyncio.timeout(self.settings.kafka_produce_timeout_s):
                futures = [await producer.send(topic, value, key=key) for topic, key, value in messages]
                metadata = await asyncio.gather(*futures)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise KafkaUnavailable(f"Kafka did not acknowledge: {type(exc).__name__}: {exc}") from exc
        return list(metadata) if return_metadata else []

    async def stop(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connect_task
        if self._producer is not None:
            await self._producer.stop()
