"""The main stream: events and assignments of the same users (co-partitioned), enriched, deduplicated,
logged to ClickHouse and aggregated into rollups, exactly once across crashes.

Recovery design (ClickHouse is the checkpoint)
-----------------------------------------------
Every flush writes, after its rows, a checkpoint per topic partition (``stream_checkpoints``): the
last record applied and a hash of its bytes. When a worker gets partitions (``on_partitions_assigned``)
it commits, for each, the offset after its checkpoint (after checking that the record at that offset
is still the same record: the embedded broker recreates topics from offset 0 when it restarts), so
Faust resumes there whatever it had committed before. Before processing, it reads the partition's
state back from ClickHouse: the users' first assignments (merged with the Faust table
``user_assignments``) and their stored events (event_logs FINAL), from which it recomputes every
user's rollup contribution and the partition's totals. Records are processed contiguously from the
checkpoint; event_ids already written are dropped. Which assignment records write a row is decided
against the assignments table's own rows, not the merged state: the table's changelog runs ahead of
the flushes, and a record replayed after a crash must still write its row. Kafka offsets are
acknowledged to Faust only after their rows are in ClickHouse (records before the checkpoint, skipped,
with the next flush), so a SIGKILL at any moment either replays records (deduplicated) or
loses nothing. This does not depend on a Faust changelog being complete, which matters on the
embedded broker: tansu's ListOffsets(latest) answers the start of the last batch, so changelog
recovery stops short of the end there.

Enrichment rule
---------------
An event carries the assignments its user had when the gateway received it: for each experiment the
first assignment of the latest phase whose first assignment has assigned_at <= received_at. Events and assignments
travel on different topics, so an assignment can reach the worker after an event received later than
it; when it does, the user's recent events (ABSTREAM_ENRICH_LOOKBACK_S, kept in memory) that it applies
to are written again with the new enrichment and a higher ``enriched_version`` (event_logs is a
ReplacingMergeTree; read it with FINAL), and the rollups move with them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiokafka.partitioner import DefaultPartitioner
from faust.types import TP

from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, Settings
from schemas.analysis import DEFAULT_RULES, ExperimentRules
from schemas.events import decode_record
from schemas.experiments import load_manifest
from stream_workers.checkpoints import CHECKPOINT_COLUMNS, checkpoint_row, fill_gap, record_digest
from stream_workers.rollups import (
    MS_PER_DAY,
    Assignment,
    Funnels,
    Key,
    Stats,
    Totals,
    UserEvent,
    UserState,
    contribution,
)
from stream_workers.rules import RULES_REFRESH_S, RULES_SQL, rules_from_registry
from stream_workers.sink import ASSIGNMENT_COLUMNS, EVENT_LOG_COLUMNS, ClickHouseWriter

log = logging.getLogger(__name__)

STORABLE_MIN_MS, STORABLE_MAX_MS = 0, 4_294_967_295_000
"""Event times a row can hold: rollup days are ClickHouse Date and DateTime (1970-01-01 .. 2106-02-07). The gateway
keeps every time within days of its clock; a record from elsewhere that is not is stored at its receive time,
because one unstorable row would stop the whole partition (each insert failing and retried forever)."""

RECENT_PER_USER = 500  # events per user kept for re-enrichment (within ABSTREAM_ENRICH_LOOKBACK_S)


@dataclass
class PartitionState:
    partition: int
    users: dict[str, UserState] = field(default_factory=dict)
    contrib: dict[str, dict[Key, Stats]] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    # per user: (event, its last written row), so a late assignment can re-enrich it
    recent: dict[str, deque[tuple[UserEvent, list[Any]]]] = field(default_factory=dict)
    events_next: int = 0  # next offset to process, per topic (records before it are applied)
    assignments_next: int = 0
    # last processed record per topic: (offset, its bytes), for the checkpoint
    last_record: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    event_rows: list[list[Any]] = field(default_factory=list)
    assignment_rows: list[list[Any]] = field(default_factory=list)
    pending_acks: list[tuple[Any, Any]] = field(default_factory=list)
    watermark_ms: int | None = None
    # (user, experiment) -> the assignment whose row the assignments table holds or is about to: decides which
    # records write a row. The users' own state can know more (the Faust table's changelog runs ahead of the
    # flushes), and a record replayed after a crash must still write its row.
    written: dict[tuple[str, int, int], Assignment] = field(default_factory=dict)

    def user(self, user_id: str) -> UserState:
        u = self.users.get(user_id)
        if u is None:
            u = self.users[user_id] = UserState()
        return u


class Pipeline:
    def __init__(self, settings: Settings, app: faust.App, writer: ClickHouseWriter) -> None:
        self.settings = settings
        self.app = app
        self.writer = writer
        self.flush_rows = settings.worker_flush_rows
        self.dedup_window_ms = settings.dedup_window_s * 1000
        self.lookback_ms = settings.enrich_lookback_s * 1000
        self.events_topic = settings.topic(TOPIC_EVENTS)
        self.assignments_topic = settings.topic(TOPIC_ASSIGNMENTS)
        self.partitions: dict[int, PartitionState] = {}
        manifest = load_manifest(settings.manifest_file)
        self.funnels = Funnels(manifest.funnels)
        self.manifest_experiments = manifest.experiments
        self.rules: dict[int, ExperimentRules] = rules_from_registry((), manifest.experiments)
        self._rules_read_at = 0.0
        self.table = app.Table("user_assignments", default=dict, partitions=settings.kafka_partitions)
        self.flush_lock = asyncio.Lock()
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.partitioner = DefaultPartitioner()
        self._inflight: asyncio.Future[None] | None = None
        self._rebuild_lock = asyncio.Lock()
        self.resume: dict[TP, int] = {}  # where each assigned topic partition resumes (checkpoint_offsets)

    # ---- partition lifecycle ---------------------------------------------------------------------

    def revoke(self, partitions: set[int]) -> None:
        """Forget revoked partitions: their unacknowledged records go to the next owner."""
        for p in partitions:
            self.partitions.pop(p, None)

    async def state_for(self, partition: int) -> PartitionState:
        part = self.partitions.get(partition)
        if part is None:
            async with self._rebuild_lock:
                part = self.partitions.get(partition)
                if part is None:
                    part = await self.rebuild(partition)
                    self.partitions[partition] = part
        return part

    async def wait_writes(self) -> None:
        """Return once no write is in flight (checkpoints are read after this)."""
        async with self.flush_lock:
            if self._inflight is not None:
                await self._inflight
                self._inflight = None

    async def ensure_partitions(self) -> None:
        """After a rebalance: rebuild every assigned partition at once, so an idle one resumes too."""
        for tp in sorted(self.app.consumer.assignment()):
            if tp.topic == self.events_topic:
                await self.state_for(tp.partition)

    async def refresh_rules(self, force: bool = False) -> None:
        """Re-read each experiment's analysis rules from the registry table (every RULES_REFRESH_S); the users
        of an experiment whose rules changed are re-contributed, so the rollups follow an edit."""
        if not force and time.monotonic() - self._rules_read_at < RULES_REFRESH_S:
            return
        self._rules_read_at = time.monotonic()
        rules = rules_from_registry(await self.writer.query(RULES_SQL), self.manifest_experiments)
        changed = {k for k in rules.keys() | self.rules.keys() if rules.get(k) != self.rules.get(k)}
        self.rules = rules
        if not changed:
            return
        log.info("analysis rules changed for experiments %s: re-contributing their users", sorted(changed))
        for part in self.partitions.values():
            for user_id, user in part.users.items():
                if not changed.isdisjoint(user.assignments):
                    self._recontribute(part, user_id, user)

    def rules_for(self, experiment_id: int) -> ExperimentRules:
        return self.rules.get(experiment_id, DEFAULT_RULES)

    async def rebuild(self, partition: int) -> PartitionState:
        """Read this partition's state back from ClickHouse (see the module docstring)."""
        t0 = time.perf_counter()
        if not self.partitions:
            await self.refresh_rules(force=True)
        part = PartitionState(partition)
        q = self.writer.query
        params = {"p": partition}
        part.events_next = self.resume.get(TP(self.events_topic, partition), 0)
        part.assignments_next = self.resume.get(TP(self.assignments_topic, partition), 0)
        rows = await q(
            "SELECT user_id, experiment_id, experiment_key, variant_id, variant_key, phase, "
            "toUnixTimestamp64Milli(assigned_at), assignment_version FROM assignments FINAL "
            "WHERE kafka_partition = {p:UInt16} ORDER BY assigned_at",
            params,
        )
        for user_id, exp_id, exp_key, variant_id, variant_key, phase, at_ms, version in rows:
            a = Assignment(exp_id, exp_key, variant_id, variant_key, phase, at_ms, version)
            self._keep_first(part.user(user_id), a)
            self._keep_written(part, user_id, a)
        self._merge_table(part)
        now_ms = int(time.time() * 1000)
        rows = await q(
            "SELECT user_id, event_id, event_name, kind, toUnixTimestamp64Milli(event_time), "
            "toUnixTimestamp64Milli(received_at), platform, app_version, experiment_id, metric_value, assignments "
            "FROM event_logs FINAL WHERE kafka_partition = {p:UInt16}",
            params,
        )
        for user_id, event_id, name, kind, t_ms, recv_ms, platform, version, exp_id, value, assignments in rows:
            ev = event_from_log(event_id, name, kind, t_ms, recv_ms, platform, version, exp_id, value, assignments)
            part.user(user_id).add_event(ev, self.funnels)
            if recv_ms >= now_ms - self.dedup_window_ms:
                part.seen[(user_id, event_id)] = recv_ms
        for user_id, user in part.users.items():
            contrib = contribution(user, self.funnels, self.rules)
            part.contrib[user_id] = contrib
            part.totals.add(contrib)
        part.totals.dirty = part.totals.keys()  # rewrite every total once: converge after any crash
        log.info(
            "partition %d rebuilt from ClickHouse in %.2fs: %d users, %d events; resuming at events %d, assignments %d",
            partition, time.perf_counter() - t0, len(part.users), len(rows), part.events_next, part.assignments_next,
        )  # fmt: skip
        return part

    def _merge_table(self, part: PartitionState) -> None:
        """First assignments the Faust table holds for this partition's users (first one wins)."""
        n = self.settings.kafka_partitions
        for user_id, stored in list(self.table.items()):
            if self.partitioner(user_id.encode(), list(range(n)), list(range(n))) != part.partition:
                continue
            for data in stored.values():
                self._keep_first(part.user(user_id), Assignment(**data))

    @staticmethod
    def _keep_first(user: UserState, a: Assignment) -> tuple[bool, bool]:
        """Keep the user's first assignment of each phase (events are attributed by phase) and of the latest
        phase (what results count); whether each is new: (first of its phase, first of the latest phase)."""
        by_phase = user.phases.setdefault(a.experiment_id, {})
        cur = by_phase.get(a.phase)
        phase_first = cur is None or a.assigned_at_ms < cur.assigned_at_ms
        if phase_first:
            by_phase[a.phase] = a
        if not supersedes(a, user.assignments.get(a.experiment_id)):
            return phase_first, False
        user.assignments[a.experiment_id] = a
        return phase_first, True

    @staticmethod
    def _keep_written(part: PartitionState, user_id: str, a: Assignment) -> bool:
        """The table's rule (one row per user, experiment and phase: the earliest): True when ``a`` needs a row.
        A phase-1 assignment read after the phase-2 one (two gateways, a retried publish) still gets its row."""
        key = (user_id, a.experiment_id, a.phase)
        cur = part.written.get(key)
        if cur is not None and cur.assigned_at_ms <= a.assigned_at_ms:
            return False
        part.written[key] = a
        return True

    # ---- processing -------------------------------------------------------------------------------

    async def handle(self, stream: Any, event: Any) -> None:
        """Process each partition's records contiguously from what ClickHouse holds, whatever was committed.

        A record past the next expected offset means the consumer position ran ahead of what is written
        (Faust starts at Kafka's committed offsets, and a seek back can be undone by records in flight): the
        records in between are read directly from the broker and applied first. A record before it was
        already applied: skip it.
        """
        message = event.message
        part = await self.state_for(message.partition)
        is_events = message.topic == self.events_topic
        expected = part.events_next if is_events else part.assignments_next
        if message.offset > expected and not await self._fill_gap(part, is_events, message.topic, expected,
                                                                  message.offset):  # fmt: skip
            return  # the partition went to another owner meanwhile: it starts from its own checkpoint
        if message.offset >= expected:
            self._apply(part, is_events, message.topic, message.offset, message.value)
        part.pending_acks.append((stream, event))  # acknowledged with the flush that writes its rows
        if sum(len(p.event_rows) for p in self.partitions.values()) >= self.flush_rows:
            # Blocks while ClickHouse is away (the writer retries): the agent stops consuming meanwhile.
            await self.flush()

    async def _fill_gap(self, part: PartitionState, is_events: bool, topic: str, start: int, end: int) -> bool:
        """Apply the records ``start``..``end - 1`` read directly from the broker (see ``fill_gap``)."""
        log.warning("partition %d: %s records %d..%d are read directly (the consumer is past them)",
                    part.partition, topic, start, end - 1)  # fmt: skip

        def apply(offset: int, value: bytes) -> None:
            self._apply(part, is_events, topic, offset, value)

        def owned() -> bool:
            return self.partitions.get(part.partition) is part

        async def flush_when_full() -> None:
            if sum(len(p.event_rows) for p in self.partitions.values()) >= self.flush_rows:
                await self.flush()

        return await fill_gap(self.settings, TP(topic, part.partition), start, end, apply, owned, flush_when_full)

    def _apply(self, part: PartitionState, is_events: bool, topic: str, offset: int, value: bytes) -> None:
        if is_events:
            self._on_events(part, offset, value)
            part.events_next = offset + 1
        else:
            self._on_assignment(part, offset, value)
            part.assignments_next = offset + 1
        part.last_record[topic] = (offset, value)  # hashed at flush, not per record

    def _on_events(self, part: PartitionState, offset: int, value: bytes) -> None:
        try:
            rec = decode_record(value)
        except ValueError as exc:
            log.error("events partition %d offset %d: unreadable record skipped: %s", part.partition, offset, exc)
            return
        user_id: str = rec["user_id"]
        received: int = rec["received_at_ms"]
        user = part.user(user_id)
        attrib = user.attribution_for(received)
        enrichment = enrichment_columns(attrib)
        attribution = attribution_of(attrib)
        recent = part.recent.get(user_id)
        if recent is None:
            recent = part.recent[user_id] = deque(maxlen=RECENT_PER_USER)
        surface = rec["surface"]
        partition = part.partition
        seen = part.seen
        rows = part.event_rows
        funnels = self.funnels
        add_event = user.add_event
        watermark = part.watermark_ms or 0
        changed = False
        for ev in rec["events"]:
            event_id = ev["event_id"]
            key = (user_id, event_id)
            if key in seen:
                continue
            seen[key] = received
            corrected = ev["corrected_at_ms"]
            occurred = ev["occurred_at_ms"]
            t_ms = occurred if corrected is None else corrected
            skew = ev["skew_ms"]
            if not (
                STORABLE_MIN_MS <= t_ms < STORABLE_MAX_MS
                and STORABLE_MIN_MS <= occurred < STORABLE_MAX_MS
                and (skew is None or STORABLE_MIN_MS <= received - skew < STORABLE_MAX_MS)
            ):
                log.warning("events partition %d offset %d: event time out of range, stored at its receive time",
                            part.partition, offset)  # fmt: skip
                t_ms = occurred = received
                corrected = skew = None
            exp_id = ev["experiment_id"]
            metric_exp = None if exp_id is None else int(exp_id)
            value = ev["value"]
            platform = ev["platform"] or ""
            app_version = ev["app_version"] or ""
            name = ev["event_name"]
            kind = ev["kind"]
            user_event = UserEvent(event_id, name, kind, t_ms, received, platform, app_version, metric_exp,
                                   value, attribution)  # fmt: skip
            add_event(user_event, funnels)
            occurred_raw = ev["occurred_at"]
            # properties/context go in as JSON objects: ClickHouse stores their text in the String columns
            # (input_format_json_read_objects_as_strings), so they are serialised once, by orjson.
            row = [
                event_id, name, kind, user_id, ev["session_id"] or "", ev["install_id"] or "", platform,
                app_version, surface, t_ms / 1000, occurred / 1000,
                "" if occurred_raw is None else str(occurred_raw), received / 1000,
                None if skew is None or ev["sent_at"] is None else (received - skew) / 1000,
                None if corrected is None else corrected / 1000, skew, ev["properties"], ev["context"],
                metric_exp, ev["metric_name"] or "", None if value is None else float(value), *enrichment,
                partition, offset, 1,
            ]  # fmt: skip
            rows.append(row)
            recent.append((user_event, row))
            if t_ms > watermark:
                watermark = t_ms
            changed = True
        if changed:
            part.watermark_ms = watermark
            self._recontribute(part, user_id, user)

    def _on_assignment(self, part: PartitionState, offset: int, value: bytes) -> None:
        try:
            rec = orjson.loads(value)
            a = Assignment(
                int(rec["experiment_id"]), rec["experiment_key"], int(rec["variant_id"]), rec["variant_key"],
                int(rec["phase"]), int(rec["assigned_at"]), rec["assignment_version"],
            )  # fmt: skip
            user_id = rec["user_id"]
        except (ValueError, KeyError, TypeError) as exc:
            log.error("assignments partition %d offset %d: unreadable record skipped: %s", part.partition, offset, exc)
            return
        user = part.user(user_id)
        phase_first, first = self._keep_first(user, a)  # a new first of its phase: attribution may change
        if self._keep_written(part, user_id, a):  # else its row is written (or pending)
            part.assignment_rows.append([
                user_id, a.experiment_id, a.experiment_key, a.variant_id, a.variant_key, a.phase,
                a.assignment_version, a.assigned_at_ms / 1000, rec.get("platform") or "",
                rec.get("app_version") or "", rec.get("surface") or "", part.partition, offset,
            ])  # fmt: skip
        if first:
            stored = dict(self.table[user_id])
            stored[str(a.experiment_id)] = a.as_json() | {"assignment_version": a.assignment_version}
            self.table[user_id] = stored
        if not phase_first:
            return  # the state knew it already (from the Faust table or ClickHouse): at most its row was missing
        # re-enrich recent events received at or after this assignment (they arrived before it did)
        horizon = int(time.time() * 1000) - self.lookback_ms
        recent = part.recent.get(user_id, ())
        for i, (ev, old_row) in enumerate(recent):
            if ev.received_at_ms < a.assigned_at_ms or ev.received_at_ms < horizon:
                continue
            attrib = user.attribution_for(ev.received_at_ms)
            attribution = attribution_of(attrib)
            if attribution == ev.attribution:
                continue
            user.add_event(ev, self.funnels, -1)
            ev.attribution = attribution
            user.add_event(ev, self.funnels, +1)
            row = list(old_row)
            row[21:24] = enrichment_columns(attrib)
            row[-1] = old_row[-1] + 1
            recent[i] = (ev, row)
            part.event_rows.append(row)
        self._recontribute(part, user_id, user)

    def _recontribute(self, part: PartitionState, user_id: str, user: UserState) -> None:
        new = contribution(user, self.funnels, self.rules)
        part.totals.replace(part.contrib.get(user_id, {}), new)
        part.contrib[user_id] = new

    # ---- flushing ---------------------------------------------------------------------------------

    async def flush(self, wait: bool = False) -> None:
        """Hand buffered rows and changed totals to the writer; acknowledgements follow once written.

        One write is in flight at a time: processing goes on while it runs, and a flush that finds the
        previous write unfinished waits for it (backpressure: while ClickHouse is away the writer
        retries, this waits, and the agent stops consuming).
        """
        async with self.flush_lock:
            if self._inflight is not None:
                await self._inflight
                self._inflight = None
            batch = self._collect()
            if batch is not None:
                self._inflight = asyncio.ensure_future(self._write(batch))
            if wait and self._inflight is not None:
                await self._inflight
                self._inflight = None

    def _collect(self) -> dict[str, Any] | None:
        parts = [p for p in self.partitions.values()
                 if p.pending_acks or p.totals.dirty or p.event_rows or p.assignment_rows]  # fmt: skip
        if not parts:
            return None
        batch: dict[str, Any] = {
            "t0": time.perf_counter(), "event_rows": [], "assignment_rows": [], "acks": [],
            "rollups": {k: [] for k in ROLLUP_TABLES}, "watermark": None,
            "partitions": sorted(p.partition for p in parts), "checkpoints": [],
        }  # fmt: skip
        for p in parts:
            batch["event_rows"] += p.event_rows
            batch["assignment_rows"] += p.assignment_rows
            batch["acks"] += p.pending_acks
            p.event_rows, p.assignment_rows, p.pending_acks = [], [], []
            version = time.time_ns() // 1000  # grows across topic incarnations and owners
            for key, stats in p.totals.take_dirty():
                batch["rollups"][key[0]].append(rollup_row(key, stats, p.partition, version, self.funnels))
            if p.watermark_ms is not None and (batch["watermark"] is None or p.watermark_ms > batch["watermark"]):
                batch["watermark"] = p.watermark_ms
            batch["checkpoints"] += [
                checkpoint_row(topic, p.partition, offset, record_digest(value))
                for topic, (offset, value) in p.last_record.items()
            ]
        return batch

    async def _write(self, batch: dict[str, Any]) -> None:
        w = self.writer
        rollups = batch["rollups"]
        await w.insert("event_logs", batch["event_rows"], EVENT_LOG_COLUMNS)
        await w.insert("assignments", batch["assignment_rows"], ASSIGNMENT_COLUMNS)
        for kind, (table, columns) in ROLLUP_TABLES.items():
            await w.insert(table, rollups[kind], columns)
        # the checkpoint goes last: if this dies before it, a restart replays and deduplicates
        await w.insert("stream_checkpoints", batch["checkpoints"], CHECKPOINT_COLUMNS)
        for stream, event in batch["acks"]:
            await stream.ack(event)
        n_rollups = sum(len(v) for v in rollups.values())
        await w.insert(
            "rollup_runs",
            [[time.time(), self.worker_name, batch["partitions"], len(batch["event_rows"]),
              len(batch["assignment_rows"]), n_rollups, _seconds(batch["watermark"]),
              (time.perf_counter() - batch["t0"]) * 1000]],
            ["run_at", "worker", "partitions", "event_rows", "assignment_rows", "rollup_rows", "watermark",
             "duration_ms"],
        )  # fmt: skip
        self._prune()

    def status(self) -> str:
        parts = ", ".join(
            f"p{p.partition}: next {p.events_next}/{p.assignments_next} "
            f"buffered {len(p.event_rows)} unacked {len(p.pending_acks)}"
            for p in sorted(self.partitions.values(), key=lambda p: p.partition)
        )
        inflight = "idle" if self._inflight is None else ("done" if self._inflight.done() else "writing")
        return f"writer {inflight}, ClickHouse {'up' if self.writer.healthy else 'DOWN'}; {parts or 'no partitions'}"

    def _prune(self) -> None:
        now_ms = int(time.time() * 1000)
        for p in self.partitions.values():
            if len(p.seen) > 100_000:
                cutoff = now_ms - self.dedup_window_ms
                p.seen = {k: v for k, v in p.seen.items() if v >= cutoff}
            cutoff = now_ms - self.lookback_ms
            for user_id in [u for u, d in p.recent.items() if not d or d[-1][0].received_at_ms < cutoff]:
                del p.recent[user_id]


METRIC_COLUMNS = ["experiment_id", "variant_id", "metric", "day", "kafka_partition", "users_with_metric",
                  "event_count", "n", "sum_x", "sum_x2", "version"]  # fmt: skip
EXPOSURE_COLUMNS = ["experiment_id", "variant_id", "day", "kafka_partition", "users", "version"]
FUNNEL_COLUMNS = ["funnel_key", "experiment_id", "variant_id", "step", "step_name", "kafka_partition", "users",
                  "version"]  # fmt: skip
DAILY_COLUMNS = ["day", "event_name", "platform", "app_version", "kafka_partition", "events", "unique_users",
                 "version"]  # fmt: skip
EXPOSED_COLUMNS = ["experiment_id", "phase", "variant_id", "kafka_partition", "users", "version"]
SOURCE_COLUMNS = ["experiment_id", "phase", "variant_id", "source", "name", "kafka_partition", "users_with_metric",
                  "event_count", "sum_x", "sum_x2", "users_with_pre", "sum_y", "sum_y2", "sum_xy", "users_with_both",
                  "users_nonzero", "version"]  # fmt: skip
EXPOSED_DAILY_COLUMNS = ["experiment_id", "phase", "variant_id", "day", "kafka_partition", "users", "version"]
RATIO_COLUMNS = ["experiment_id", "phase", "variant_id", "metric", "kafka_partition", "sum_x", "sum_x2", "sum_y",
                 "sum_y2", "sum_xy", "version"]  # fmt: skip
LAST_ACTIVE_COLUMNS = ["day", "kafka_partition", "users", "version"]
ROLLUP_TABLES = {
    "m": ("experiment_metric_rollups_by_partition", METRIC_COLUMNS),
    "e": ("experiment_exposures_by_partition", EXPOSURE_COLUMNS),
    "f": ("funnel_rollups_by_partition", FUNNEL_COLUMNS),
    "d": ("daily_metric_rollups_by_partition", DAILY_COLUMNS),
    "x": ("experiment_exposed_by_partition", EXPOSED_COLUMNS),
    "xd": ("experiment_exposed_daily_by_partition", EXPOSED_DAILY_COLUMNS),
    "c": ("experiment_source_rollups_by_partition", SOURCE_COLUMNS),
    "r": ("experiment_ratio_rollups_by_partition", RATIO_COLUMNS),
    "l": ("user_last_active_by_partition", LAST_ACTIVE_COLUMNS),
}
"""Rollup key kind (stream_workers.rollups) -> its *_by_partition table and columns."""


def _seconds(ms: int | None) -> float | None:
    """A DateTime64(3) value for JSON input: epoch seconds with milliseconds, or null."""
    return None if ms is None else ms / 1000


def rollup_row(key: Key, stats: Stats, partition: int, version: int, funnels: Funnels) -> list[Any]:
    kind = key[0]
    if kind == "m":
        _, exp, variant, metric, day = key
        users, count, n, sx, sx2 = stats
        return [exp, variant, metric, day, partition, int(users), int(count), int(n), sx, sx2, version]
    if kind == "e":
        _, exp, variant, day = key
        return [exp, variant, day, partition, int(stats[0]), version]
    if kind == "x":
        return [*key[1:], partition, int(stats[0]), version]
    if kind == "xd":
        return [*key[1:], partition, int(stats[0]), version]
    if kind == "c":
        wm, count, sx, sx2, wp, sy, sy2, sxy, wb, nz = stats
        return [*key[1:], partition, int(wm), int(count), sx, sx2, int(wp), sy, sy2, sxy, int(wb), int(nz), version]
    if kind == "r":
        return [*key[1:], partition, *(float(v) for v in stats), version]
    if kind == "l":
        return [key[1], partition, int(stats[0]), version]
    if kind == "f":
        _, funnel_key, exp, variant, step = key
        spec = funnels.by_key.get(funnel_key)
        names = spec.steps if spec else ()
        step_name = names[step - 1] if step - 1 < len(names) else ""
        return [funnel_key, exp, variant, step, step_name, partition, int(stats[0]), version]
    _, day, name, platform, app_version = key
    return [day, name, platform, app_version, partition, int(stats[0]), int(stats[1]), version]


def supersedes(a: Assignment, cur: Assignment | None) -> bool:
    """``a`` is of a later phase than ``cur``, or of its phase and earlier: the assignment to keep."""
    return cur is None or (a.phase, -a.assigned_at_ms) > (cur.phase, -cur.assigned_at_ms)


def attribution_of(attrib: tuple[Assignment, ...]) -> tuple[tuple[int, int, int], ...]:
    """What the rollups keep of an event's enrichment: (experiment_id, variant_id, phase) of each assignment."""
    return tuple((a.experiment_id, a.variant_id, a.phase) for a in attrib)


def enrichment_columns(attrib: tuple[Assignment, ...]) -> list[Any]:
    """assignment_version, assignments (JSON), experiment_map for an event's assignment context."""
    if not attrib:
        return ["", "[]", {}]
    latest = max(attrib, key=lambda a: a.assigned_at_ms)
    return [
        latest.assignment_version,
        orjson.dumps([a.as_json() for a in attrib]).decode(),
        {a.experiment_key: a.variant_key for a in attrib},
    ]


def event_from_log(
    event_id: str, name: str, kind: str, t_ms: int, recv_ms: int, platform: str, version: str,
    exp_id: int | None, value: float | None, assignments: str,
) -> UserEvent:  # fmt: skip
    """A stored event_logs row as the rollups see it (used by the rebuild and by `abstream verify`)."""
    attribution = tuple((int(a["experiment_id"]), int(a["variant_id"]), int(a.get("phase", 1)))
                        for a in orjson.loads(assignments or "[]"))  # fmt: skip
    return UserEvent(event_id, name, kind, int(t_ms), int(recv_ms), platform, version, exp_id, value, attribution)


__all__ = ["MS_PER_DAY", "Pipeline", "event_from_log", "rollup_row"]
