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
from collections.abc import Iterable
from hashlib import sha1
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
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
    """(offset, digest) of the first record at or after ``offset``, or None when there is none."""
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
            return None
        msgs = batch.get(ktp, [])
        return (msgs[0].offset, record_digest(msgs[0].value)) if msgs else None
    finally:
        await consumer.stop()


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
