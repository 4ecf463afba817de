"""Kafka plumbing shared by the gateway, the workers and the tools: topic layout and client settings.

``events`` and ``assignments`` have the same partition count and are both keyed by user id, so a
user's events and assignments land on the same partition number (the workers' enrichment relies on
that co-partitioning). ``experiments`` is a single-partition compacted topic: the registry log.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import zstandard
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, TOPIC_EXPERIMENTS, TOPIC_REJECTED, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic abstream uses, with its physical (prefixed) name."""
    n = settings.kafka_partitions
    return [
        TopicSpec(settings.topic(TOPIC_EVENTS), n, {}),
        TopicSpec(settings.topic(TOPIC_ASSIGNMENTS), n, {}),
        TopicSpec(settings.topic(TOPIC_REJECTED), n, {}),
        TopicSpec(settings.topic(TOPIC_EXPERIMENTS), 1, {"cleanup.policy": "compact"}),
    ]


async def ensure_topics(settings: Settings) -> None:
    """Create missing topics (idempotent; safe to call from every process at start)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.kafka_replication_factor,
                topic_configs=spec.config,
            )
            for spec in topic_specs(settings)
            if spec.name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process won the race
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()


CODEC_LEVELS = {"zstd": 1, "lz4": 1}
"""Compression level of every producer batch, where aiokafka fixes one (zstd 3, lz4 9 = LZ4 HC). Measured on
the 2-core box, one stamped 50-event request (31 KB, a batch under moderate load): zstd-1 40 µs at 8.2x
(zstd-3: 50 µs, 8.3x), lz4-1 21 µs at 5.0x (lz4-9: 125 µs, 6.1x), snappy 23 µs at 4.8x."""

_RECORD_BUILDERS = ("aiokafka.codec", "aiokafka.record.default_records", "aiokafka.record._crecords.default_records")
"""Where aiokafka looks its encoders up: the codec module, and the record-batch builders (pure Python and C),
which import ``zstd_encode`` by name, so each module's own binding is the one a batch calls."""


class ZstdEncoder:
    """zstd for producer batches with one compression context per thread, reused batch after batch.

    aiokafka 0.14's ``codec.zstd_encode`` (cramjam) creates a new context for every batch: measured on a 31 KB
    batch (one stamped 50-event request), 44 µs against 30 µs with the context reused, the same frame size at
    the same level. The frames are standard zstd frames (content size in the header), which Kafka, tansu and
    every consumer decompress as before. python-zstandard's compressor is not thread-safe, hence one per thread.
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def __call__(self, payload: bytes | bytearray | memoryview, level: int | None = None) -> bytes:
        """``level`` is accepted for aiokafka's signature and ignored: the context's level is fixed."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor.compress(payload)


def _install_zstd(level: int) -> None:
    encoder = ZstdEncoder(level)
    for name in _RECORD_BUILDERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # aiokafka built without its C extensions
            continue
        current = getattr(module, "zstd_encode", None)
        if current is None:
            log.warning("aiokafka's %s has no zstd_encode any more; keeping its zstd encoder", name)
            return
        if isinstance(current, ZstdEncoder) and current.level == level:
            continue
        module.zstd_encode = encoder  # type: ignore[attr-defined]


def _set_lz4_level(level: int) -> None:
    """aiokafka 0.14 has no compression-level option: its ``codec.lz4_encode(payload, level=9)`` (LZ4 HC), which
    its record builders call for every batch, takes the level as a keyword default. Give that parameter ours."""
    from aiokafka import codec

    encode = codec.lz4_encode
    if encode.__defaults__ not in ((9,), (level,)):
        log.warning("aiokafka's lz4_encode changed; keeping its default compression level")
        return
    encode.__defaults__ = (level,)


def install_codec(compression: str) -> None:
    """Make aiokafka compress at :data:`CODEC_LEVELS` (and zstd with a reused context); idempotent."""
    if compression == "zstd":
        _install_zstd(CODEC_LEVELS["zstd"])
    elif compression == "lz4":
        _set_lz4_level(CODEC_LEVELS["lz4"])


def producer_settings(settings: Settings) -> dict[str, Any]:
    """aiokafka producer arguments: acks=all always; idempotence where the broker supports it."""
    install_codec(settings.kafka_compression)
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        # zstd-1 by default: the best ratio (8.2x a stamped request, against ~5x for lz4-1 and snappy) at a cost
        # the gateway does not notice: at 1,000 requests/s, gateway CPU per request with zstd, lz4 and snappy
        # was the same within this box's noise (660-920 µs each, alternating runs). lz4 at aiokafka's level 9
        # (LZ4 HC) cost ~25% of the gateway's CPU at full rate, hence CODEC_LEVELS.
        "compression_type": None if settings.kafka_compression == "none" else settings.kafka_compression,
        # No linger: aiokafka keeps one produce request in flight per broker, so records accumulate into
        # batches while it is out anyway (measured: same or better events/s than linger_ms=5 under
        # `abstream bench ingest`); a linger only delays lone records, e.g. an assignment's (p50 5.5 -> ~1.5 ms).
        # With two gateway processes at half of their maximum rate, 3 ms cut the broker's CPU by ~10-25% but not
        # the gateway's p99 (4 alternating runs each: median ~31 ms with 3 ms, ~28.5 ms without).
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "request_timeout_ms": int(settings.kafka_produce_timeout_s * 1000),
    }
