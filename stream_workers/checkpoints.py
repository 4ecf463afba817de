"""Where a worker resumes a topic partition: the record after the last one whose rows are in ClickHouse.

Each flush writes, after its rows, one ``stream_checkpoints`` row per topic partition: the last record
applied and a hash of its bytes. Before resuming, the worker checks that the record at that offset is
still the same record. A recreated topic (the embedded broker keeps nothing across its own restart)
starts again at offset 0, and its offsets must not be taken for the old topic's; then the partition
is read from the start and already-written events are dropped by event_id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from hashlib import sha1
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from faust.types import TP

from abstream.config import Settings
from stream_workers.sink import ClickHouseWriter

log = logging.getLogger(__name__)

CHECKPOINT_COLUMNS = ["topic", "kafka_partition", "kafka_offset", "record_sha1", "written_at"]


def record_digest(value: bytes) -> str:
    """Identity of a Kafka record's bytes (not a security use)."""
    return sha1(value, usedforsecurity=False).hexdigest()


def checkpoint_row(topic: str, partition: int, offset: int, digest: str) -> list[Any]:
    return [topic, partition, offset, digest, time.time()]


async def record_at(settings: Settings, tp: TP, offset: int) -> tuple[int, str] | None:
    """(offset, digest) of the first record at or after ``offset``, or None when there is none.

    When retention has removed ``offset`` (the log now starts after it), the answer is the log's start with
    an empty digest: the checkpoint is older than what the log keeps, not a sign of a recreated topic (whose
    log starts again at 0), and reading it from the start would apply records already written again."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="none", max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    ktp = TopicPartition(tp.topic, tp.partition)  # aiokafka's own type (Faust's TP is not accepted)
    await consumer.start()
    try:
        consumer.assign([ktp])
        consumer.seek(ktp, offset)
        try:
            batch = await consumer.getmany(ktp, timeout_ms=2000, max_records=1)
        except OffsetOutOfRangeError:
            start = (await consumer.beginning_offsets([ktp]))[ktp]
            return (start, "") if start > offset else None
        msgs = batch.get(ktp, [])
        return (msgs[0].offset, record_digest(msgs[0].value)) if msgs else None
    finally:
        await consumer.stop()


GAP_BATCH = 1000  # records applied between two chances to flush
GAP_STALL_S = 10.0  # a direct read that gets no record for this long starts again (the broker may be away)


async def read_range(settings: Settings, tp: TP, start: int, end: int) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Batches of the records of ``tp`` at offsets ``start`` up to (not including) ``end``, read with a consumer
    of its own and yielded as fetched (at most GAP_BATCH at a time: a long gap is never held in memory at once).

    Done when the consumer's position reaches ``end`` (the caller holds the record at ``end``, so the log goes
    that far); offsets the log does not have (compacted away, transaction markers, removed by retention) are
    passed over. An empty fetch is not the end: aiokafka answers one when the broker is slow or away, so no
    progress for GAP_STALL_S raises TimeoutError rather than ending the read short.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    ktp = TopicPartition(tp.topic, tp.partition)
    await consumer.start()
    try:
        consumer.assign([ktp])
        consumer.seek(ktp, start)
        progress_at = time.monotonic()
        first = True
        while True:
            fetched = (await consumer.getmany(ktp, timeout_ms=1000, max_records=GAP_BATCH)).get(ktp, [])
            if fetched:
                progress_at = time.monotonic()
                if first and fetched[0].offset > start:
                    log.warning("%s[%d]: offsets %d..%d are not in the log (retention or compaction)",
                                tp.topic, tp.partition, start, min(fetched[0].offset, end) - 1)  # fmt: skip
                first = False
                batch = [(m.offset, m.value) for m in fetched if start <= m.offset < end]
                if batch:
                    yield batch
            if await consumer.position(ktp) >= end:
                return
            if time.monotonic() - progress_at > GAP_STALL_S:
                raise TimeoutError(f"no record for {GAP_STALL_S:.0f} s before offset {end}")
    finally:
        await consumer.stop()


async def fill_gap(
    settings: Settings, tp: TP, start: int, end: int, apply: Callable[[int, bytes], None],
    owned: Callable[[], bool], after_batch: Callable[[], Awaitable[None]] | None = None,
) -> bool:  # fmt: skip
    """Apply, in order, every record of ``tp`` from ``start`` up to ``end``, read directly from the broker.

    Retries for as long as ``owned()`` (the partition is still this worker's): while the broker is away nothing
    can be consumed anyway, as a flush waits while ClickHouse is away. True when the range is applied; False
    when the partition went to another owner (records applied so far were applied to a state that is dropped).

    Why not seek the worker's consumer back: Faust drops every record below the highest offset it has handed
    to the stream, and records of the batch being delivered while the seek happens raise that mark again, so a
    seek back from the middle of a stream can be undone each time and the partition never gets past the gap.
    """
    delay = 0.5
    attempt = 0
    while owned():
        attempt += 1
        try:
            async for batch in read_range(settings, tp, start, end):
                if not owned():
                    return False
                for offset, value in batch:
                    apply(offset, value)
                    start = offset + 1
                if after_batch is not None:
                    await after_batch()
            return True
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("%s[%d]: reading offsets %d..%d directly failed (attempt %d), again in %.1f s: %s",
                        tp.topic, tp.partition, start, end - 1, attempt, delay, exc)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    return False


async def resume_offsets(writer: ClickHouseWriter, settings: Settings, tps: Iterable[TP]) -> dict[TP, int]:
    """The offset to resume at for each topic partition (0 without a valid checkpoint)."""
    tps = sorted(tps)
    if not tps:
        return {}
    rows = await writer.query(
        "SELECT topic, kafka_partition, kafka_offset, record_sha1 FROM stream_checkpoints FINAL "
        "WHERE topic IN {topics:Array(String)}",
        {"topics": sorted({tp.topic for tp in tps})},
    )
    saved = {TP(t, p): (int(o), h) for t, p, o, h in rows}
    out: dict[TP, int] = dict.fromkeys(tps, 0)
    checked = [tp for tp in tps if tp in saved]
    # all at once: on an empty (restarted) broker every check waits out its fetch timeout
    found_at = await asyncio.gather(*(record_at(settings, tp, saved[tp][0]) for tp in checked))
    for tp, found in zip(checked, found_at, strict=True):
        offset, digest = saved[tp]
        if found is None or (found[0] == offset and found[1] != digest):
            log.warning(
                "%s[%d]: the record at checkpoint %d is gone or different: the topic was recreated; "
                "reading it from the start", tp.topic, tp.partition, offset,
            )  # fmt: skip
        else:
            out[tp] = offset + 1  # the same record (or older than retention keeps): resume after it
    return out
