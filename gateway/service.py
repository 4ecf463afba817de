"""The one core behind both API surfaces: assign, ingest, publish, answer.

Surfaces (calicritters.py, arkforge.py) only read their request shape and call these methods, so validation,
assignment and the Kafka acknowledgement rule exist once. Nothing here answers 2xx for anything Kafka
has not acknowledged: a missing acknowledgement is a 503 with Retry-After and nothing reported accepted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from abstream.config import TOPIC_ASSIGNMENTS, TOPIC_EVENTS, TOPIC_REJECTED, Settings
from gateway.assignment import ab_assign_response, assign, decide, epoch_ms, from_epoch_ms, record_for
from gateway.dedup import DedupCache
from gateway.ingest import IngestResult
from gateway.publisher import KafkaUnavailable, Message, Publisher
from gateway.records import refused_request
from gateway.registry import Registry
from gateway.results import RollupReader
from schemas.ab_tests import ABAssignRequest
from schemas.assignment import AssignmentRequest
from schemas.errors import ApiError, validation_failed
from schemas.experiments import Experiment

log = logging.getLogger(__name__)

RETRY_AFTER_S = "2"

Handler = Callable[[Request], Awaitable[Response]]

DEAD_LETTER_GIVE_UP_S = 600
"""How long a dead letter published in the background keeps being retried through a broker outage."""

MAX_PENDING_DEAD_LETTERS = 1_000
"""Background dead-letter publishes (of refused requests, and of requests with nothing accepted) waiting for Kafka at
once, per process; beyond, their dead letters are dropped (and counted) so that a flood of bad requests while Kafka
is slow cannot pile up tasks without bound."""


async def clock_reaches(moment: datetime) -> None:
    """Return once the wall clock is at ``moment`` or later (an assignment stamp, at most 1 ms ahead; the
    Kafka acknowledgement awaited before usually took longer, so this rarely sleeps)."""
    target_ns = epoch_ms(moment) * 1_000_000
    deadline = time.monotonic_ns() + 3_000_000  # a wall clock stepped back (NTP, a VM resumed) is not waited out
    while (ahead_ns := target_ns - time.time_ns()) > 0 and time.monotonic_ns() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(ahead_ns / 1e9)


def unavailable(reason: str) -> ApiError:
    """503 for a request Kafka did not acknowledge. The cause (the client library's exception) is logged, not sent:
    an error body never echoes a backend exception."""
    log.warning("kafka unavailable: %s", reason)
    return ApiError(
        503,
        "kafka_unavailable",
        "the event log did not acknowledge, nothing was accepted; retry later",
        headers={"Retry-After": RETRY_AFTER_S},
    )


def invalid_body(message: str) -> ApiError:
    """400 for a body of the wrong JSON type, naming ``body`` in details like every other 400."""
    return ApiError(
        400, "invalid_body", f"body {message}", [{"field": "body", "code": "invalid_body", "message": message}]
    )


class GatewayCore:
    def __init__(self, settings: Settings, publisher: Publisher, registry: Registry) -> None:
        self.settings = settings
        self.publisher = publisher
        self.registry = registry
        self.dedup = DedupCache.from_settings(settings)
        self.rollups = RollupReader(settings)
        self.events_topic = settings.topic(TOPIC_EVENTS)
        self.rejected_topic = settings.topic(TOPIC_REJECTED)
        self.assignments_topic = settings.topic(TOPIC_ASSIGNMENTS)
        self._dead_letters: set[asyncio.Task[None]] = set()
        self.dead_letters_dropped = 0
        self._drop_warnings = 0

    # ---- shared ---------------------------------------------------------------------------------

    async def publish(self, messages: list[Message]) -> None:
        try:
            await self.publisher.publish(messages)
        except KafkaUnavailable as exc:
            raise unavailable(str(exc)) from exc

    def require_registry(self) -> None:
        if not self.registry.ready:
            raise ApiError(
                503,
                "registry_not_ready",
                self.registry.startup_error or "the experiment registry is still loading",
                headers={"Retry-After": RETRY_AFTER_S},
            )

    def experiment(self, test_id: str) -> Experiment:
        """The experiment behind an ArkForge ``{test_id}``: 404 when unknown (ids are integers)."""
        self.require_registry()
        if not (test_id.isascii() and test_id.isdigit()):  # int() alone also takes " 3", "+3", "1_0", "٣"
            raise ApiError(404, "test_not_found", f"no test with id {test_id!r}")
        experiment_id = int(test_id)
        experiment = self.registry.state.by_id(experiment_id)
        if experiment is None:
            raise ApiError(404, "test_not_found", f"no test with id {experiment_id}")
        return experiment

    def experiment_by_ref(self, ref: str) -> Experiment:
        """An experiment by ArkForge id or by key (tests.json experiments are known by key): 404 when unknown."""
        self.require_registry()
        experiment = self.registry.state.by_key(ref)
        if experiment is None:
            return self.experiment(ref)
        return experiment

    @staticmethod
    def received_at_ms() -> int:
        return time.time_ns() // 1_000_000

    @staticmethod
    def assignment_instant() -> datetime:
        """When an assignment made now is stamped: the next millisecond of the clock events are stamped with.

        An event counts for an experiment when it is received at or after the assignment (``received_at_ms >=
        assigned_at``), and both are whole milliseconds. A client that sends an event, gets its answer and then
        asks for its variant can do all of it within one millisecond; stamped with that millisecond, the
        assignment would claim the event. One millisecond later, it is after every event already received on
        this host; and since the answer waits for the clock to reach it (:func:`clock_reaches`), every event sent
        after the answer is stamped at or after it."""
        return from_epoch_ms(time.time_ns() // 1_000_000 + 1)

    # ---- events ---------------------------------------------------------------------------------

    async def ingest(self, result: IngestResult) -> dict[str, Any]:
        """Publish the accepted events (one record per user) and the dead letters, then answer per event.

        With nothing accepted, the dead letters go in the background, like a refused request's: the answer (all
        rejected, or the 400 of a single event) does not depend on Kafka, and a 503 would tell the client to
        retry what can never succeed."""
        dead_letters: list[Message] = [(self.rejected_topic, r.key, r.value) for r in result.rejected_records]
        if result.records:
            await self.publish([(self.events_topic, r.key, r.value) for r in result.records] + dead_letters)
        elif dead_letters:
            self._publish_in_background(result.surface, dead_letters)
        result.acknowledge(self.dedup)
        return result.body()

    def validate(self, ingest: Callable[..., IngestResult], payload: Any, *args: Any) -> IngestResult:
        """Run one ``gateway.ingest.ingest_*`` on a parsed body, now; a refusal carries the body for its dead letter."""
        try:
            return ingest(payload, *args, self.received_at_ms(), self.settings, self.dedup)  # type: ignore[no-any-return]
        except ApiError as err:
            if err.sent is None:  # a duplicate_key refusal already carries the body as sent, both keys in it
                err.sent = payload
            raise

    def record_refusal(self, surface: str, err: ApiError) -> None:
        """Send the dead letter of an ingestion request refused as a whole to ``events.rejected``, in the
        background: the 400/413/415 answer does not wait for Kafka, and a failure is only logged."""
        record = refused_request(surface, self.received_at_ms(), err, self.settings)
        if record is not None:
            self._publish_in_background(surface, [(self.rejected_topic, record.key, record.value)])

    def _publish_in_background(self, surface: str, dead_letters: list[Message]) -> None:
        if len(self._dead_letters) >= MAX_PENDING_DEAD_LETTERS:
            self.dead_letters_dropped += len(dead_letters)
            if self.dead_letters_dropped // MAX_PENDING_DEAD_LETTERS > self._drop_warnings:
                self._drop_warnings = self.dead_letters_dropped // MAX_PENDING_DEAD_LETTERS
                log.warning("%d dead letters dropped: Kafka is not keeping up", self.dead_letters_dropped)
            return
        task = asyncio.create_task(self._publish_dead_letters(surface, dead_letters))
        self._dead_letters.add(task)
        task.add_done_callback(self._dead_letters.discard)

    async def _publish_dead_letters(self, surface: str, dead_letters: list[Message]) -> None:
        lost = await self.publisher.deliver(dead_letters, DEAD_LETTER_GIVE_UP_S)
        if lost:
            self.dead_letters_dropped += lost
            log.warning(
                "%d dead letters of a %s request dropped: Kafka did not take them within %d s",
                lost, surface, DEAD_LETTER_GIVE_UP_S,
            )  # fmt: skip

    async def drain_dead_letters(self, timeout_s: float) -> None:
        """At shutdown: a moment for the dead letters still on their way (a broker outage may hold them)."""
        if self._dead_letters:
            await asyncio.wait(list(self._dead_letters), timeout=timeout_s)

    # ---- assignment -----------------------------------------------------------------------------

    async def assign_v1(self, payload: Any) -> dict[str, Any]:
        """POST /v1/assignment: every eligible RUNNING experiment, merged config, records published first."""
        if not isinstance(payload, dict):
            raise invalid_body("must be a JSON object with anonymous_user_id")
        try:
            request = AssignmentRequest.model_validate(payload, context={"settings": self.settings})
        except ValidationError as exc:
            raise validation_failed(exc) from None
        self.require_registry()
        state = self.registry.state
        now = self.assignment_instant()
        result = assign(state.live, request, now, version=state.version)
        records = result.records("v1")
        if records:
            await self.publish([(self.assignments_topic, r.user_id.encode(), r.to_bytes()) for r in records])
            await clock_reaches(now)
        return result.response().model_dump(mode="json")

    async def assign_ab(self, test_id: str, payload: Any) -> dict[str, Any]:
        """POST /apiv1/ab-tests/{test_id}/assign: this user's variant of one test, the same on every call."""
        experiment = self.experiment(test_id)
        if not isinstance(payload, dict):
            raise invalid_body("must be a JSON object with user_id")
        try:
            request = ABAssignRequest.model_validate(payload, context={"settings": self.settings})
        except ValidationError as exc:
            raise validation_failed(exc) from None
        now = self.assignment_instant()
        version = self.registry.state.version
        decision = decide(experiment, request.user_id, now)
        if decision.variant is not None:
            record = record_for(
                experiment, decision.variant, request.user_id, version=version, now=now, surface="apiv1"
            )
            await self.publish([(self.assignments_topic, request.user_id.encode(), record.to_bytes())])
            await clock_reaches(now)
        return ab_assign_response(experiment, request.user_id, decision, version).model_dump(mode="json")


def records_refusals(surface: str) -> Callable[[Handler], Handler]:
    """Route decorator of the ingestion endpoints: a request refused as a whole (malformed JSON, a bad envelope
    field, too many events, 413, 415) leaves one dead letter in ``events.rejected``, like each rejected event of
    an answered request, so the ingestion dashboard shows every kind of mistake clients make."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as err:
                core: GatewayCore = request.app.state.core
                core.record_refusal(surface, err)
                raise

        return route

    return decorate
