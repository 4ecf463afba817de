"""Wires the worker's agents onto one Faust app.

* ``user_stream``: events + assignments (co-partitioned by user) -> event_logs, assignments, rollups.
* ``registry_copy``: the compacted `experiments` topic -> experiments / experiment_variants / phases.
* ``rejected_copy``: `events.rejected` -> rejected_events.
Each buffers rows, writes them with retries, and acknowledges records to Faust only once written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import faust
import orjson

from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, TOPIC_EXPERIMENTS, TOPIC_REJECTED, Settings
from gateway.assignment import bucket_bounds
from stream_workers.app import create_app
from stream_workers.pipeline import Pipeline
from stream_workers.sink import ClickHouseWriter

log = logging.getLogger(__name__)

class CopySink:
    """Append-only copy of one topic into ClickHouse tables, resuming after the offsets already written."""

    def __init__(
        self,
        writer: ClickHouseWriter,
        table: str,
        to_rows: Callable[[bytes, int, int], dict[str, list[list[Any]]]],
        columns: dict[str, list[str]],
    ) -> None:
        self.writer = writer
        self.table = table  # the table whose (kafka_partition, kafka_offset) marks what is written
        self.to_rows = to_rows
        self.columns = columns
        self.written: dict[int, int] = {}
        self.rows: dict[str, list[list[Any]]] = {t: [] for t in columns}
        self.acks: list[tuple[Any, Any]] = []

    async def handle(self, stream: Any, event: Any) -> None:
        msg = event.message
        if msg.partition not in self.written:
            # the table name is ours (a constant of this module); the partition is a bound parameter
            ((max_offset, n),) = await self.writer.query(
                f"SELECT max(kafka_offset), count() FROM {self.table} WHERE kafka_partition = {{p:UInt16}}",  # noqa: S608
                {"p": msg.partition},
            )
            self.written[msg.partition] = int(max_offset) if n else -1
        if msg.offset > self.written[msg.partition]:
            try:
                for table, rows in self.to_rows(msg.value, msg.partition, msg.offset).items():
                    self.rows[table] += rows
            except (ValueError, KeyError, TypeError) as exc:
                log.error("%s offset %d: unreadable record skipped: %s", msg.topic, msg.offset, exc)
        self.acks.append((stream, event))

    async def flush(self) -> None:
        if not self.acks:
            return
        rows, self.rows = self.rows, {t: [] for t in self.columns}
        acks, self.acks = self.acks, []
        for table, table_rows in rows.items():
            await self.writer.insert(table, table_rows, self.columns[table])
        for stream, event in acks:
            await stream.ack(event)

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.written.pop(p, None)


def rejected_rows(value: bytes, partition: int, offset: int) -> dict[str, list[list[Any]]]:
    rec = orjson.loads(value)
    return {
        "rejected_events": [[
            rec["received_at_ms"] / 1000, rec["surface"], rec["code"], rec["field"],
            rec["message"], int(rec["index"]), rec.get("user_id") or "", rec["raw"], partition, offset,
        ]]
    }  # fmt: skip


REJECTED_COLUMNS = {
    "rejected_events": ["received_at", "surface", "code", "field", "message", "event_index", "user_id", "raw",
                        "kafka_partition", "kafka_offset"],
}  # fmt: skip


def _dt(value: str | None) -> float | None:
    """An ISO timestamp as epoch seconds (the sink's DateTime64 input), or None."""
    return datetime.fromisoformat(value).timestamp() if value else None


def registry_rows(value: bytes, partition: int, offset: int) -> dict[str, list[list[Any]]]:
    """One version of one experiment; version = topic offset, so ReplacingMergeTree keeps the newest."""
    rec = orjson.loads(value)
    exp = rec["experiment"]
    created = _dt(exp.get("created_at")) or rec["written_at"] / 1000
    written = rec["written_at"] / 1000
    bounds = [0, *bucket_bounds([v["weight"] for v in exp["variants"]])]
    return {
        "experiments": [[
            exp["id"], exp["key"], exp["name"], exp.get("description") or "", exp["status"], _dt(exp.get("start_at")),
            _dt(exp.get("end_at")), exp["coverage"], exp.get("hash_seed") or exp["key"], exp["phase"],
            _dt(exp.get("phase_started_at")), orjson.dumps(exp.get("targeting") or {}).decode(),
            orjson.dumps(exp.get("baseline_config") or {}).decode(), rec["source"], created, written,
            value.decode(), offset,
        ]],
        "experiment_variants": [
            [exp["id"], v["id"], v["key"], v["name"], v.get("description") or "", v["weight"], i,
             bounds[i], bounds[i + 1], orjson.dumps(v.get("config_overrides") or {}).decode(), offset]
            for i, v in enumerate(exp["variants"])
        ],
        "experiment_phases": [[
            exp["id"], exp["phase"], exp.get("hash_seed") or exp["key"],
            _dt(exp.get("phase_started_at")) or created, offset,
        ]],
    }  # fmt: skip


REGISTRY_COLUMNS = {
    "experiments": ["experiment_id", "experiment_key", "name", "description", "status", "start_at", "end_at",
                    "coverage", "hash_seed", "phase", "phase_started_at", "targeting", "baseline_config", "source",
                    "created_at", "updated_at", "definition", "version"],
    "experiment_variants": ["experiment_id", "variant_id", "variant_key", "variant_name", "description", "weight",
                            "position", "bucket_start", "bucket_end", "config_overrides", "version"],
    "experiment_phases": ["experiment_id", "phase", "hash_seed", "started_at", "version"],
}  # fmt: skip


class RegistryCopy(CopySink):
    """The registry copy has no offset column: ReplacingMergeTree(version=offset) makes replays harmless."""

    async def handle(self, stream: Any, event: Any) -> None:
        self.written.setdefault(event.message.partition, -1)
        await super().handle(stream, event)


def build(settings: Settings) -> faust.App:
    app = create_app(settings)
    writer = ClickHouseWriter(settings)
    pipeline = Pipeline(settings, app, writer)
    rejected = CopySink(writer, "rejected_events", rejected_rows, REJECTED_COLUMNS)
    registry = RegistryCopy(writer, "experiments", registry_rows, REGISTRY_COLUMNS)

    user_topics = app.topic(
        settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_ASSIGNMENTS), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )  # fmt: skip
    rejected_topic = app.topic(settings.topic(TOPIC_REJECTED), key_serializer="raw", value_serializer="raw")
    experiments_topic = app.topic(settings.topic(TOPIC_EXPERIMENTS), key_serializer="raw", value_serializer="raw")

    @app.agent(user_topics)
    async def user_stream(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await pipeline.handle(s, event)

    @app.agent(rejected_topic)
    async def rejected_copy(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await rejected.handle(s, event)

    @app.agent(experiments_topic)
    async def registry_copy(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await registry.handle(s, event)

    @app.timer(interval=settings.worker_flush_interval_s)
    async def flush() -> None:
        await pipeline.flush()
        await rejected.flush()
        await registry.flush()

    @app.timer(interval=10.0)
    async def report() -> None:
        log.info("pipeline: %s", pipeline.status())

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        """Commit, for every assigned partition, the offset after what ClickHouse holds: Faust then
        seeks there (it resumes streams at committed offsets), whatever was committed before."""
        mine = {tp.partition for tp in assigned if tp.topic in pipeline_topics}
        for p in list(pipeline.partitions):
            if p not in mine:
                pipeline.partitions.pop(p, None)
        if mine:
            offsets = await pipeline.checkpoint_offsets(mine)
            await app.consumer._thread.commit(offsets)  # noqa: SLF001 - raw offsets, not Faust's acks
            log.info("resuming %s from ClickHouse checkpoints", {f"{tp.topic}[{tp.partition}]": o
                                                                  for tp, o in offsets.items()})  # fmt: skip

    @app.on_rebalance_complete.connect
    async def on_rebalanced(app: faust.App, **kwargs: Any) -> None:
        async def rebuild_all() -> None:
            for _ in range(600):  # recovery completes after this signal
                if app.tables.recovery.completed.is_set():
                    break
                await asyncio.sleep(0.05)
            await pipeline.ensure_partitions()

        asyncio.ensure_future(rebuild_all())

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        pipeline.revoke({tp.partition for tp in revoked if tp.topic in pipeline_topics})
        rejected.revoke({tp.partition for tp in revoked if tp.topic == rejected_topic_name})

    pipeline_topics = {settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_ASSIGNMENTS)}
    rejected_topic_name = settings.topic(TOPIC_REJECTED)
    return app
