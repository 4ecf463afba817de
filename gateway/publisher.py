"""The gateway's Kafka producer: connects in the background, publishes, and says when Kafka is down.

The gateway answers 2xx for an event only after Kafka acknowledged it (acks=all). When the broker is
unreachable or slower than ABSTREAM_PRODUCE_TIMEOUT_S, ``publish`` raises ``KafkaUnavailable`` and
the route answers 503 with Retry-After; the producer keeps reconnecting, so ingestion resumes
without a gateway restart.

``ready`` (``/health/ready``) is False until the first connection, and again while Kafka is unreachable: since
a publish failed or the once-a-second broker check did, until one of them succeeds. A gateway that cannot
reach Kafka cannot take any write (events and assignments both wait for Kafka's acknowledgement).

Topics that vanish are re-created (``ensure_topics``): after any failed publish, before the next one,
and when a once-a-second metadata check finds one missing (a broker restarted while this gateway was
idle). Kafka answers UnknownTopicOrPartition for a topic it does not have (the publish times out and
the next one creates it); the embedded tansu, which keeps nothing across a restart, acknowledges
records for a topic it does not have and drops them: without this, a 2xx for events stored nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, RequestTimedOutError
from aiokafka.structs import RecordMetadata

from abstream.config import Settings
from abstream.kafka import ensure_topics, producer_settings, topic_specs

log = logging.getLogger(__name__)

Message = tuple[str, bytes | None, bytes]  # (topic, key, value)

TOPIC_CHECK_INTERVAL_S = 1.0
BROKER_CHECK_TIMEOUT_S = 2.0


_MAYBE_WRITTEN = (RequestTimedOutError, KafkaConnectionError)
"""Failures after the produce request reached the broker: the record may have been written (a frozen broker writes
it when it resumes), so it is not sent again. Without idempotence (tansu) a resend would write it twice."""


class Deadline:
    """``asyncio.timeout(delay)`` on a loop known in advance: raises TimeoutError out of the block when ``delay``
    seconds pass first, and lets any other cancellation through, as asyncio's does.

    Why not asyncio's: on Python 3.11 every ``asyncio.get_running_loop()`` is a getpid() system call, and
    ``asyncio.timeout`` makes three per use (its factory, ``current_task()``, ``reschedule()``). Around each
    publish they took ~2.5% of the gateway's CPU samples under ``abstream bench ingest`` (py-spy --native put
    3.3% of the gateway's samples in getpid alone).
    """

    __slots__ = ("_loop", "_delay", "_task", "_handle", "_cancelling", "_expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_later(self._delay, self._on_timeout)
        return self

    def _on_timeout(self) -> None:
        self._task.cancel()
        self._expired = True

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        self._handle.cancel()
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; nothing of the request may be reported as accepted."""


class Publisher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # connected once (start-up)
        self._reachable = True  # the last publish or broker check got an answer
        self._topics_checked = True  # set False by a failed publish: re-create missing topics first
        self._topics_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        """Connected, and Kafka answered the last publish or broker check."""
        return self._ready.is_set() and self._reachable

    async def start(self) -> None:
        """Return at once; connect (and create topics) in the background, retrying with backoff."""
        self._loop = asyncio.get_running_loop()
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
            self._watch_task = asyncio.create_task(self._watch_topics(producer), name="kafka-topics")
            return

    async def _watch_topics(self, producer: AIOKafkaProducer) -> None:
        """Notice topics gone missing while no publish failed (the broker restarted empty meanwhile), and
        whether Kafka answers at all (readiness)."""
        wanted = {spec.name for spec in topic_specs(self.settings)}
        while True:
            await asyncio.sleep(TOPIC_CHECK_INTERVAL_S)
            try:
                # A metadata answer takes milliseconds: 2 s without one is a broker that does not answer.
                async with asyncio.timeout(min(self.settings.kafka_produce_timeout_s, BROKER_CHECK_TIMEOUT_S)):
                    cluster = await producer.client.fetch_all_metadata()  # lists topics, creates none
                self._set_reachable(True)
                if wanted - cluster.topics():
                    self._topics_checked = False
                    await self._recreate_topics()
            except Exception as exc:  # noqa: BLE001 - keep watching whatever the broker does
                self._topics_checked = False
                self._set_reachable(False)
                log.debug("Kafka topic check failed: %s", exc)

    def _set_reachable(self, reachable: bool) -> None:
        if reachable != self._reachable:
            self._reachable = reachable
            if reachable:
                log.info("Kafka at %s answers again: ready", self.settings.kafka_bootstrap_servers)
            else:
                log.warning("Kafka at %s does not answer: not ready", self.settings.kafka_bootstrap_servers)

    async def publish(self, messages: Sequence[Message], return_metadata: bool = False) -> list[RecordMetadata]:
        """Send every message and wait until Kafka acknowledged all of them, or raise KafkaUnavailable."""
        producer = self._producer
        if producer is None or self._loop is None:
            raise KafkaUnavailable("not connected to Kafka yet")
        try:
            async with Deadline(self._loop, self.settings.kafka_produce_timeout_s):
                if not self._topics_checked:
                    await self._recreate_topics()
                futures = [await producer.send(topic, value, key=key) for topic, key, value in messages]
                # one record (one user, no dead letter) is the common case: gather() would wrap it in another future
                metadata = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        except (TimeoutError, KafkaError, OSError) as exc:
            self._topics_checked = False
            self._set_reachable(False)
            raise KafkaUnavailable(f"Kafka did not acknowledge: {type(exc).__name__}: {exc}") from exc
        self._set_reachable(True)
        return list(metadata) if return_metadata else []

    async def deliver(self, messages: Sequence[Message], give_up_s: float) -> int:
        """Background delivery of what no client waits for (dead letters), through a broker outage: a message
        is sent again, after a backoff, only when it surely was not written (never while it may still land, nor
        after a request the broker got but did not answer: ``_MAYBE_WRITTEN``), until every message is
        acknowledged or ``give_up_s`` passed. Returns how many were given up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + give_up_s
        pending = list(messages)
        delay = 0.5
        while True:
            pending = await self._attempt(pending)
            if not pending:
                return 0
            if loop.time() + delay > deadline:
                return len(pending)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _attempt(self, messages: list[Message]) -> list[Message]:
        """Send each message once and wait for its outcome; the ones Kafka did not take."""
        producer = self._producer
        if producer is None:
            return messages
        futures: list[asyncio.Future[RecordMetadata]] = []
        try:
            # aiokafka fails a send after request_timeout_ms (the produce timeout); the bound is only a backstop
            async with asyncio.timeout(3 * self.settings.kafka_produce_timeout_s + 5):
                if not self._topics_checked:
                    await self._recreate_topics()
                for topic, key, value in messages:
                    futures.append(await producer.send(topic, value, key=key))
        except (TimeoutError, KafkaError, OSError) as exc:
            self._topics_checked = False
            log.debug("dead letters not sent yet: %s", exc)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed = []
        for message, outcome in zip(messages, outcomes, strict=False):
            if isinstance(outcome, _MAYBE_WRITTEN):
                log.warning("a dead letter to %s may be lost: the broker did not answer (%r)", message[0], outcome)
            elif isinstance(outcome, BaseException):
                failed.append(message)
        return failed + messages[len(futures) :]

    async def _recreate_topics(self) -> None:
        """Once after a failure (concurrent publishes wait for the first one): create the topics that are missing."""
        async with self._topics_lock:
            if not self._topics_checked:
                await ensure_topics(self.settings)
                self._topics_checked = True
                log.info("Kafka topics checked after a failure")

    async def stop(self) -> None:
        for task in (self._connect_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._producer is not None:
            await self._producer.stop()
