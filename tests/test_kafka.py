"""Producer settings: the compression setting, the zstd level we give aiokafka, a real round trip per codec, and
the gateway's publish deadline."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import cramjam
import pytest
import zstandard
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, codec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from abstream.bench import loadgen
from abstream.config import KAFKA_COMPRESSIONS, Settings
from abstream.kafka import CODEC_LEVELS, ZstdEncoder, producer_settings
from gateway.publisher import Deadline


def test_unknown_compression_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="ABSTREAM_KAFKA_COMPRESSION: 'brotli' is not one of zstd, snappy"):
        Settings.from_env({"ABSTREAM_KAFKA_COMPRESSION": "brotli"})


@pytest.mark.parametrize("name", KAFKA_COMPRESSIONS)
def test_compression_setting_reaches_the_producer(name: str) -> None:
    settings = Settings.from_env({"ABSTREAM_KAFKA_COMPRESSION": name})
    args = producer_settings(settings)
    assert args["compression_type"] == (None if name == "none" else name)
    assert args["acks"] == "all"


def test_zstd_batches_use_our_level_not_aiokafkas_three() -> None:
    producer_settings(Settings.from_env({}))
    data = b"".join(loadgen.v1_body(p, "zstd") for p in loadgen.make_v1_payloads(8, 50))  # ~130 KB of events
    ours = codec.zstd_encode(data)
    assert ours == zstandard.ZstdCompressor(level=CODEC_LEVELS["zstd"]).compress(data)
    assert ours != zstandard.ZstdCompressor(level=3).compress(data)
    assert bytes(cramjam.zstd.decompress(ours)) == data  # what aiokafka's own decoder reads


def test_record_batches_are_built_with_the_reused_zstd_context() -> None:
    """The batch builders (C and Python) call our encoder, and what it writes reads back with aiokafka's decoder."""
    from aiokafka.record import default_records

    producer_settings(Settings.from_env({}))
    assert isinstance(default_records.zstd_encode, ZstdEncoder)
    builder_modules = [default_records]
    with contextlib.suppress(ImportError):
        from aiokafka.record._crecords import default_records as c_default_records

        builder_modules.append(c_default_records)
    values = [loadgen.v1_body(p, "batch") for p in loadgen.make_v1_payloads(3, 50)]
    for module in builder_modules:
        assert isinstance(module.zstd_encode, ZstdEncoder)
        builder = module.DefaultRecordBatchBuilder(
            magic=2, compression_type=4, is_transactional=False, producer_id=-1, producer_epoch=-1,
            base_sequence=-1, batch_size=1 << 22,
        )  # fmt: skip
        for offset, value in enumerate(values):
            builder.append(offset, timestamp=None, key=b"k", value=value, headers=[])
        batch = module.DefaultRecordBatch(bytes(builder.build()))
        assert batch.compression_type == 4
        assert [record.value for record in batch] == values


@pytest.mark.parametrize("name", ["zstd", "snappy", "none"])
def test_each_codec_round_trips_through_the_broker(settings: Settings, name: str) -> None:
    """What the gateway's producer sends with each codec is read back unchanged by a plain consumer."""
    settings = Settings.from_env(
        {**settings.as_env(), "ABSTREAM_KAFKA_COMPRESSION": name},
    )
    topic = settings.topic(f"codec-{name}-{uuid.uuid4().hex[:6]}")
    values = [f'{{"n":{i},"pad":"{"x" * (i % 300)}"}}'.encode() for i in range(500)]

    async def run() -> list[bytes]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, settings.kafka_replication_factor)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(**producer_settings(settings))
        await producer.start()
        try:
            futures = [await producer.send(topic, v, key=b"k") for v in values]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.kafka_bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            async with asyncio.timeout(20):
                while len(got) < len(values):
                    batch = await consumer.getmany(timeout_ms=500)
                    got += [m.value for msgs in batch.values() for m in msgs if m.value is not None]
        finally:
            await consumer.stop()
        return got

    assert asyncio.run(run()) == values


# ------------------------------------------------------------------ the gateway's publish deadline


def test_deadline_raises_timeout_error_and_leaves_the_task_uncancelled() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with Deadline(loop, 0.05):
                await asyncio.sleep(10)
        assert 0.04 <= loop.time() - start < 1.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        async with Deadline(loop, 0.05):  # finished in time: nothing fires later
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)

    asyncio.run(main())


def test_deadline_lets_other_cancellations_through() -> None:
    async def blocked(delay: float, entered: asyncio.Event) -> None:
        async with Deadline(asyncio.get_running_loop(), delay):
            entered.set()
            await asyncio.sleep(10)

    async def main() -> None:
        for delay in (5.0, 0.0):  # cancelled from outside before the deadline, and at the same time as it fires
            entered = asyncio.Event()
            task = asyncio.create_task(blocked(delay, entered))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()

    asyncio.run(main())
