"""The experiment registry: tests.json and /apiv1/ab-tests feed one log, the compacted `experiments` topic.

Every gateway replica folds that topic, in order, into the same in-memory registry, so replicas
converge without talking to each other (a create on one replica is served by another as soon as its
consumer reads the record, typically well under a second). Writers never change memory directly: they
publish a record, wait until their own consumer has applied it, and then look whether they won (first
writer wins for a name, a key or an id; a loser that only lost an id retries with the next one).

At start a replica reads the topic to its end; if the topic is empty (the embedded broker keeps
nothing across its own restart) it restores every experiment from ClickHouse `experiments`, where
the workers copy each version. Then it applies tests.json: entries whose content changed since they
were last applied are published as creates or as checked updates (``check_edit``), untouched entries
are left alone so that runtime edits survive restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from abstream.config import TOPIC_EXPERIMENTS, Settings
from gateway.assignment import check_edit
from gateway.publisher import KafkaUnavailable, Publisher
from schemas.ab_tests import ABTestCreate
from schemas.errors import ApiError
from schemas.experiments import Experiment, Manifest, load_manifest
from schemas.registry import RegistryRecord, RegistryState

log = logging.getLogger(__name__)


class RegistryStartupError(RuntimeError):
    """tests.json cannot be applied (malformed, or an edit that would move assigned users)."""


def manifest_sha(experiment: Experiment) -> str:
    return hashlib.sha256(orjson.dumps(experiment.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


class Registry:
    """The gateway's view of the registry, kept current by a background consumer."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.topic = settings.topic(TOPIC_EXPERIMENTS)
        self.state = RegistryState()
        self._applied_offset = -1
        self._offset_changed = asyncio.Condition()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._caught_up = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.startup_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ---- reading ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the topic in the background; ``ready`` turns true once caught up and tests.json applied."""
        manifest = self._load_manifest()  # a malformed manifest stops start-up here, with the bad field's path
        self._tasks = [
            asyncio.create_task(self._follow(), name="registry-follow"),
            asyncio.create_task(self._startup(manifest), name="registry-startup"),
        ]

    def _load_manifest(self) -> Manifest:
        try:
            return load_manifest(self.settings.manifest_file)
        except (OSError, ValueError) as exc:
            raise RegistryStartupError(str(exc)) from exc

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _startup(self, manifest: Manifest) -> None:
        """Once Kafka is connected (topics exist) and the log is read: restore if empty, apply tests.json."""
        delay = 0.5
        while True:
            await self.publisher.wait_ready()
            await self._caught_up.wait()
            try:
                await self._sync(manifest)
            except RegistryStartupError as exc:
                self.startup_error = str(exc)
                log.error("registry: %s", exc)
                return
            except KafkaUnavailable as exc:
                log.warning("registry: applying tests.json failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._ready.set()
            log.info("registry ready: %d experiments, version %s", len(self.state.records), self.state.version)
            return

    async def _follow(self) -> None:
        """Read the topic from the beginning, forever; reconnects when the broker goes away."""
        await self.publisher.wait_ready()  # the publisher creates the topics
        delay = 0.2
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=50,
            )
            try:
                await consumer.start()
                tp = TopicPartition(self.topic, 0)
                consumer.assign([tp])
                if self._applied_offset < 0:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, self._applied_offset + 1)
                if not self._caught_up.is_set():
                    await self._catch_up(consumer, tp)
                    self._caught_up.set()
                while True:
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    await self._apply_batch(batch.get(tp, []))
                    delay = 0.2
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                log.warning("registry consumer: %s; retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _catch_up(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        end = (await consumer.end_offsets([tp]))[tp]
        while self._applied_offset + 1 < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            await self._apply_batch(batch.get(tp, []))
        # one more short read: some brokers report the end offset of the last batch's start
        batch = await consumer.getmany(tp, timeout_ms=100)
        await self._apply_batch(batch.get(tp, []))

    async def _apply_batch(self, messages: Iterable[object]) -> None:
        last = None
        for msg in messages:
            last = msg.offset  # type: ignore[attr-defined]
            try:
                record = RegistryRecord.from_bytes(msg.value)  # type: ignore[attr-defined]
            except ValueError as exc:
                log.error("registry: skipping unreadable record at offset %s: %s", last, exc)
                continue
            self.state.apply(record)
        if last is not None:
            async with self._offset_changed:
                self._applied_offset = last
                self._offset_changed.notify_all()

    async def _wait_applied(self, offset: int, wait_s: float = 10.0) -> None:
        async with asyncio.timeout(wait_s), self._offset_changed:
            await self._offset_changed.wait_for(lambda: self._applied_offset >= offset)

    # ---- writing ------------------------------------------------------------------------------

    async def _publish(self, records: list[RegistryRecord]) -> None:
        if not records:
            return
        metas = await self.publisher.publish(
            [(self.topic, r.experiment.key.encode(), r.to_bytes()) for r in records], return_metadata=True
        )
        try:
            await self._wait_applied(max(m.offset for m in metas))
        except TimeoutError as exc:
            raise KafkaUnavailable("the registry did not see its own write in time") from exc

    @staticmethod
    def _record(op: str, experiment: Experiment, source: str, sha: str | None = None) -> RegistryRecord:
        return RegistryRecord(
            op=op,  # type: ignore[arg-type]
            experiment=experiment,
            source=source,  # type: ignore[arg-type]
            request_id=uuid.uuid4().hex,
            written_at=int(time.time() * 1000),
            manifest_sha=sha,
        )

    async def _sync(self, manifest: Manifest) -> None:
        if not self.state.records:
            restored = await self._restore_from_clickhouse()
            await self._publish(restored)
        pending: list[RegistryRecord] = []
        for exp in manifest.experiments:
            sha = manifest_sha(exp)
            current = self.state.records.get(exp.key)
            if current is None:
                pending.append(self._record("create", exp, "manifest", sha))
            elif current.manifest_sha != sha:
                if current.experiment.id != exp.id:
                    raise RegistryStartupError(
                        f"{self.settings.manifest_file}: experiment {exp.key!r} has id {exp.id}, "
                        f"but the registry has it as id {current.experiment.id}; ids never change"
                    )
                try:
                    check_edit(current.experiment, exp)
                except ApiError as err:
                    details = "; ".join(f"{d['field']}: {d['message']}" for d in err.details)
                    raise RegistryStartupError(
                        f"{self.settings.manifest_file}: experiment {exp.key!r}: {err.message} ({details})"
                    ) from err
                pending.append(self._record("update", exp, "manifest", sha))
        await self._publish(pending)
        for record in pending:
            won = self.state.records.get(record.experiment.key)
            if won is None or won.experiment.id != record.experiment.id:
                raise RegistryStartupError(
                    f"{self.settings.manifest_file}: experiment {record.experiment.key!r} (id "
                    f"{record.experiment.id}) conflicts with an experiment already in the registry"
                )

    async def _restore_from_clickhouse(self) -> list[RegistryRecord]:
        """Every experiment's latest version as the workers copied it to ClickHouse (empty if unreachable)."""
        from abstream.clickhouse import async_client

        try:
            client = await async_client(self.settings)
            try:
                result = await client.query("SELECT definition FROM experiments FINAL ORDER BY experiment_id")
            finally:
                await client.close()
        except Exception as exc:  # noqa: BLE001 - restore is best effort: no ClickHouse, no history
            log.warning("registry: could not restore from ClickHouse: %s", exc)
            return []
        records = []
        for (definition,) in result.result_rows:
            try:
                saved = RegistryRecord.model_validate(orjson.loads(definition))
            except ValueError as exc:
                log.error("registry: unreadable definition in ClickHouse: %s", exc)
                continue
            records.append(saved.model_copy(update={"op": "create", "source": "restore"}))
        if records:
            log.info("registry: restoring %d experiments from ClickHouse", len(records))
        return records

    async def create(self, body: ABTestCreate) -> Experiment:
        """POST /apiv1/ab-tests: a new RUNNING experiment; 409 when the test_name is taken."""
        async with self._write_lock:
            for _ in range(5):
                if body.test_name in self.state.key_by_name:
                    raise ApiError(409, "duplicate_test_name", f"a test named {body.test_name!r} already exists")
                now = datetime.now(UTC)
                experiment = body.to_experiment(self.state.next_id(), now, self.state.records.keys())
                record = self._record("create", experiment, "api")
                await self._publish([record])
                won = self.state.records.get(experiment.key)
                if won is not None and won.request_id == record.request_id:
                    return won.experiment
            raise ApiError(409, "registry_conflict", "could not allocate an id: too many concurrent creates")

    async def update(self, experiment_id: int, new: Experiment) -> Experiment:
        """A checked edit (``check_edit``); 404 for an unknown id, 409 when it would move users."""
        async with self._write_lock:
            current = self.state.by_id(experiment_id)
            if current is None:
                raise ApiError(404, "test_not_found", f"no test with id {experiment_id}")
            check_edit(current, new, now=datetime.now(UTC))
            record = self._record("update", new, "api", self.state.records[current.key].manifest_sha)
            await self._publish([record])
            won = self.state.records.get(new.key)
            if won is None or won.request_id != record.request_id:
                raise ApiError(409, "registry_conflict", "a concurrent edit won; read the test again and retry")
            return won.experiment
