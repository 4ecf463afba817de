"""Wires the worker's agents onto one Faust app.

* ``user_stream``: events + assignments (co-partitioned by user) -> event_logs, assignments, rollups.
* ``registry_copy``: the compacted `experiments` topic -> experiments / experiment_variants / phases.
* ``rejected_copy``: `events.rejected` -> rejected_events.
Each buffers rows, writes them with retries, and acknowledges records to Faust only once written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import faust
import orjson
from aiohttp.web import Response
from faust.types import TP

from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, TOPIC_EXPERIMENTS, TOPIC_REJECTED, Settings
from schemas.buckets import bucket_bounds
from schemas.registry import RegistryRecord, RegistryState
from stream_workers.app import create_app
from stream_workers.checkpoints import CHECKPOINT_COLUMNS, checkpoint_row, fill_gap, record_digest, resume_offsets
from stream_workers.pipeline import Pipeline
from stream_workers.sink import ClickHouseWriter

log = logging.getLogger(__name__)


class CopySink:
    """Copy of one topic into ClickHouse tables, resumed from its checkpoint (stream_workers.checkpoints).

    ``checkpointed=False`` (the registry copy) reads the whole topic every time instead: its tables are
    ReplacingMergeTree with the record's write time as version, so a replay changes nothing.
    """

    def __init__(
        self,
        app: faust.App,
        writer: ClickHouseWriter,
        to_rows: Callable[[bytes, int, int], dict[str, list[list[Any]]]],
        columns: dict[str, list[str]],
        checkpointed: bool = True,
    ) -> None:
        self.app = app
        self.writer = writer
        self.to_rows = to_rows
        self.columns = columns
        self.checkpointed = checkpointed
        self.next: dict[int, int] = {}  # partition -> next offset to copy
        self.last: dict[int, tuple[str, int, bytes]] = {}  # partition -> (topic, offset, bytes) of the last record
        self.generation = 0  # moves on at every assignment and revocation (a gap read in flight then stops)
        self.dirty = False  # rows or a checkpoint not written yet
        self.rows: dict[str, list[list[Any]]] = {t: [] for t in columns}
        self.acks: list[tuple[Any, Any]] = []
        self.lock = asyncio.Lock()

    async def handle(self, stream: Any, event: Any) -> None:
        msg = event.message
        if self.checkpointed:
            expected = self.next.get(msg.partition, 0)
            if msg.offset > expected:  # the position ran ahead of the checkpoint: read the gap directly
                generation = self.generation

                def copy(offset: int, value: bytes) -> None:
                    self._copy(msg.topic, msg.partition, offset, value)

                def owned() -> bool:
                    return self.generation == generation and msg.partition in self.next

                tp = TP(msg.topic, msg.partition)
                if not await fill_gap(self.writer.settings, tp, expected, msg.offset, copy, owned):
                    return  # the partition went to another owner meanwhile: it starts from its own checkpoint
        if not self.checkpointed or msg.offset >= self.next.get(msg.partition, 0):
            self._copy(msg.topic, msg.partition, msg.offset, msg.value)
        self.acks.append((stream, event))  # acknowledged with the flush that writes its rows

    def _copy(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        """Buffer the rows of one record (and, checkpointed, make it the partition's last)."""
        if self.checkpointed:
            self.next[partition] = offset + 1
            self.last[partition] = (topic, offset, value)  # hashed at flush
        self.dirty = True
        try:
            for table, rows in self.to_rows(value, partition, offset).items():
                self.rows[table] += rows
        except (ValueError, KeyError, TypeError) as exc:
            log.error("%s offset %d: unreadable record skipped: %s", topic, offset, exc)

    async def flush(self) -> None:
        async with self.lock:
            if not self.acks and not self.dirty:
                return
            self.dirty = False
            rows, self.rows = self.rows, {t: [] for t in self.columns}
            acks, self.acks = self.acks, []
            checkpoints = [checkpoint_row(t, p, o, record_digest(v)) for p, (t, o, v) in self.last.items()]
            for table, table_rows in rows.items():
                await self.writer.insert(table, table_rows, self.columns[table])
            await self.writer.insert("stream_checkpoints", checkpoints, CHECKPOINT_COLUMNS)
            for stream, event in acks:
                await stream.ack(event)

    def assign(self, resume: dict[TP, int]) -> None:
        self.generation += 1
        self.next = {tp.partition: offset for tp, offset in resume.items()}
        self.last = {p: v for p, v in self.last.items() if p in self.next}

    def revoke(self, partitions: set[int]) -> None:
        """Forget revoked partitions (their next owner resumes from the checkpoint)."""
        self.generation += 1
        for p in partitions:
            self.next.pop(p, None)
            self.last.pop(p, None)


_USER_ID_VALUE = re.compile(
    rb'("(?:anonymous_user_id|user_id)"\s*:\s*)(?:"((?:[^"\\]|\\.)*)(?:"|\\?$)|(-?[0-9][0-9.eE+-]*))'
)


def mask_user_ids(raw: str) -> str:
    """``raw`` (a rejected request or event as sent, JSON text, possibly cut mid-id) with every user id replaced by
    ``sha256:`` and the first 16 hex digits of its SHA-256: rejections of one user still group together, and the
    table, which Grafana's read-only user can see, holds no id in clear (the logs mask them too)."""

    def hashed(match: re.Match[bytes]) -> bytes:
        digest = hashlib.sha256(match.group(2) or match.group(3) or b"").hexdigest()[:16]
        return match.group(1) + b'"sha256:' + digest.encode() + b'"'

    return _USER_ID_VALUE.sub(hashed, raw.encode("utf-8", "surrogatepass")).decode("utf-8", "replace")


def rejected_rows(value: bytes, partition: int, offset: int) -> dict[str, list[list[Any]]]:
    rec = orjson.loads(value)
    return {
        "rejected_events": [[
            rec["received_at_ms"] / 1000, rec["surface"], rec.get("scope", "event"), rec["code"], rec["field"],
            rec["message"], int(rec["index"]), rec.get("user_id") or "", mask_user_ids(rec["raw"]), partition, offset,
        ]]
    }  # fmt: skip


REJECTED_COLUMNS = {
    "rejected_events": ["received_at", "surface", "scope", "code", "field", "message", "event_index", "user_id",
                        "raw", "kafka_partition", "kafka_offset"],
}  # fmt: skip


def _dt(value: str | None) -> float | None:
    """An ISO timestamp as epoch seconds (the sink's DateTime64 input), or None."""
    return datetime.fromisoformat(value).timestamp() if value else None


def registry_rows(value: bytes, partition: int, offset: int) -> dict[str, list[list[Any]]]:
    """One version of one experiment; version = its write time, so ReplacingMergeTree keeps the newest
    (offsets would not do: a recreated topic starts again at 0)."""
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
            value.decode(), rec["written_at"],
        ]],
        "experiment_variants": [
            [exp["id"], v["id"], v["key"], v["name"], v.get("description") or "", v["weight"], i,
             bounds[i], bounds[i + 1], orjson.dumps(v.get("config_overrides") or {}).decode(), rec["written_at"]]
            for i, v in enumerate(exp["variants"])
        ],
        "experiment_phases": [[
            exp["id"], exp["phase"], exp.get("hash_seed") or exp["key"],
            _dt(exp.get("phase_started_at")) or created, rec["written_at"],
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
    """Copies the versions the registry actually applied: the worker folds the `experiments` topic with
    the gateways' own rules (gateway.registry.RegistryState), from offset 0 after every rebalance, so a
    losing concurrent create never reaches ClickHouse."""

    def __init__(self, app: faust.App, writer: ClickHouseWriter) -> None:
        super().__init__(app, writer, registry_rows, REGISTRY_COLUMNS, checkpointed=False)
        self.state = RegistryState()

    async def handle(self, stream: Any, event: Any) -> None:
        try:
            applied = self.state.apply(RegistryRecord.from_bytes(event.message.value))
        except ValueError as exc:
            log.error("experiments offset %d: unreadable record skipped: %s", event.message.offset, exc)
            applied = False
        if applied:
            await super().handle(stream, event)
        else:
            self.acks.append((stream, event))

    def assign(self, resume: dict[TP, int]) -> None:
        self.state = RegistryState()


def build(settings: Settings) -> faust.App:
    app = create_app(settings)
    writer = ClickHouseWriter(settings)
    pipeline = Pipeline(settings, app, writer)
    rejected = CopySink(app, writer, rejected_rows, REJECTED_COLUMNS)
    registry = RegistryCopy(app, writer)
    pipeline_topics = {settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_ASSIGNMENTS)}
    rejected_topic_name = settings.topic(TOPIC_REJECTED)
    experiments_topic_name = settings.topic(TOPIC_EXPERIMENTS)

    user_topics = app.topic(
        settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_ASSIGNMENTS), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )  # fmt: skip
    rejected_topic = app.topic(settings.topic(TOPIC_REJECTED), key_serializer="raw", value_serializer="raw")
    experiments_topic = app.topic(settings.topic(TOPIC_EXPERIMENTS), key_serializer="raw", value_serializer="raw")

    positioned = asyncio.Event()  # set once every assigned partition is at its checkpoint

    @app.page("/ready")
    async def ready(web: object, request: object) -> Response:
        """200 once this worker has joined its consumer group and positioned its partitions (processing);
        503 before that and during a rebalance. ``/health`` only says the process answers."""
        ok = positioned.is_set()
        body = '{"status":"ready"}' if ok else '{"status":"not_ready","reason":"joining the group or rebalancing"}'
        return Response(text=body, status=200 if ok else 503, content_type="application/json")

    @app.agent(user_topics)
    async def user_stream(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await positioned.wait()
            await pipeline.handle(s, event)

    @app.agent(rejected_topic)
    async def rejected_copy(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await positioned.wait()
            await rejected.handle(s, event)

    @app.agent(experiments_topic)
    async def registry_copy(stream: faust.StreamT) -> None:
        s = stream.noack()
        async for event in s.events():
            await positioned.wait()
            await registry.handle(s, event)

    async def flush_all() -> None:
        await pipeline.flush()
        await rejected.flush()
        await registry.flush()

    @app.timer(interval=settings.worker_flush_interval_s)
    async def flush() -> None:
        if positioned.is_set():
            await pipeline.refresh_rules()
        await flush_all()

    app.flush_while_stopping = flush_all  # Faust's timers stop first; its wait for acknowledgements needs these

    @app.timer(interval=10.0)
    async def report() -> None:
        log.info("pipeline: %s", pipeline.status())

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        """Hold processing until the partitions are positioned at their checkpoints (see below)."""
        positioned.clear()
        pipeline.partitions.clear()  # every partition is rebuilt from its checkpoint once positioned
        generation = app.consumer_generation_id

        async def position() -> None:
            # Faust seeks to Kafka's committed offsets when its recovery completes, after this signal:
            # wait for that, then seek every partition to where its ClickHouse checkpoint says.
            for _ in range(1200):
                if app.tables.recovery.completed.is_set():
                    break
                await asyncio.sleep(0.05)
            if app.consumer_generation_id != generation:
                return  # a newer rebalance took over
            await pipeline.wait_writes()  # a write still in flight would move the checkpoints
            async with rejected.lock:
                wanted = [TP(tp.topic, tp.partition) for tp in app.consumer.assignment()
                          if tp.topic in pipeline_topics or tp.topic == rejected_topic_name]  # fmt: skip
                offsets = await resume_offsets(writer, settings, wanted)
            offsets.update({TP(tp.topic, tp.partition): 0 for tp in app.consumer.assignment()
                            if tp.topic == experiments_topic_name})  # fmt: skip
            pipeline.resume = {tp: o for tp, o in offsets.items() if tp.topic in pipeline_topics}
            rejected.assign({tp: o for tp, o in offsets.items() if tp.topic == rejected_topic_name})
            registry.assign({})
            if offsets:
                await app.consumer.seek_wait(offsets)
            log.info("resuming from ClickHouse checkpoints: %s",
                     {f"{tp.topic}[{tp.partition}]": o for tp, o in sorted(offsets.items())})  # fmt: skip
            await pipeline.ensure_partitions()
            positioned.set()

        async def position_or_retry() -> None:
            delay = 0.5
            while app.consumer_generation_id == generation and not positioned.is_set():
                try:
                    await position()
                    return
                except Exception:  # noqa: BLE001 - log it and try again: processing waits for this
                    log.exception("positioning partitions at their checkpoints failed; retrying")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        asyncio.ensure_future(position_or_retry())

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        positioned.clear()  # nothing is processed until the new assignment is positioned
        pipeline.revoke({tp.partition for tp in revoked if tp.topic in pipeline_topics})
        rejected.revoke({tp.partition for tp in revoked if tp.topic == rejected_topic_name})

    return app
