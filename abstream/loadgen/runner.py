"""One loadgen run: the scenario's experiments created, its users simulated through the public HTTP surfaces at
the target rate, every answer kept in the ledger and every acknowledged event in the truth.

Each user runs in order: the history (a backfill of the ``days`` before today), then the assignment
(``/v1/assignment`` on the Calicritters surface, ``/apiv1/ab-tests/{id}/assign`` per experiment on the
ArkForge one), then the test period in real time, late sessions last, then the purchase and its tracked
values. Nothing is sent for a user before the previous request was answered, so "received after the
assignment" is known on the device side.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from abstream.loadgen.client import Device, GaveUp, Ledger
from abstream.loadgen.population import (
    MIDNIGHT_GUARD_MS,
    MS_PER_DAY,
    Multipliers,
    Purchase,
    Session,
    SimUser,
    history,
    make_user,
    test_period,
)
from abstream.loadgen.scenario import ExperimentSpec, Scenario
from abstream.loadgen.truth import METRICS, Truth, TruthEvent

HISTORY_BATCH = 50  # events per backfill request on /apiv1/events/batch


@dataclass
class CreatedExperiment:
    spec: ExperimentSpec
    id: int
    key: str
    variant_ids: dict[str, int]  # variant name -> id

    def variant_name(self, variant_id: int) -> str | None:
        return next((n for n, i in self.variant_ids.items() if i == variant_id), None)


@dataclass
class Run:
    scenario: Scenario
    run_id: str
    base_url: str
    ledger: Ledger = field(default_factory=Ledger)
    truth: Truth = field(default_factory=Truth)
    experiments: list[CreatedExperiment] = field(default_factory=list)
    users_started: int = 0
    users_done: int = 0
    refused_expected: int = 0  # events of broken-clock devices: the skew guard must refuse every one
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.finished_at or time.time()) - self.started_at


class Pacer:
    """Spaces requests so events leave at ``rate`` per second on average (a virtual send schedule)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = time.monotonic()

    async def take(self, events: int) -> None:
        now = time.monotonic()
        at = max(self.next_at, now - 0.5)  # at most half a second of catch-up burst after a stall
        self.next_at = at + events * self.interval
        if at > now:
            await asyncio.sleep(at - now)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def clear_of_midnight() -> None:
    """Wait out the seconds around a UTC midnight, so no event's day depends on a request's latency."""
    into_day = now_ms() % MS_PER_DAY
    if into_day > MS_PER_DAY - MIDNIGHT_GUARD_MS:
        await asyncio.sleep((MS_PER_DAY - into_day + MIDNIGHT_GUARD_MS) / 1000)
    elif into_day < MIDNIGHT_GUARD_MS:
        await asyncio.sleep((MIDNIGHT_GUARD_MS - into_day) / 1000)


def experiment_name(scenario: Scenario, spec: ExperimentSpec, run_id: str) -> str:
    return f"loadgen {scenario.name} {spec.name} {run_id}"


async def create_experiments(device: Device, scenario: Scenario, run_id: str) -> list[CreatedExperiment]:
    out = []
    for spec in scenario.experiments:
        body = {
            "test_name": experiment_name(scenario, spec, run_id),
            "description": f"abstream loadgen, scenario {scenario.name}, seed {scenario.seed}",
            "variants": [
                {"variant_name": v.name, "weight": v.weight, "control": v is spec.control} for v in spec.variants
            ],  # fmt: skip
            "metrics": [m.definition() for m in METRICS],
            "sequential_testing": spec.sequential_testing,
        }
        answer = await device.request("POST", "/apiv1/ab-tests", body, admin=True)
        if answer.status != 201:
            raise RuntimeError(f"creating experiment {spec.name!r}: HTTP {answer.status} {answer.body}")
        test = answer.body
        ids = {v["variant_name"]: v["id"] for v in test["variants"]}
        out.append(CreatedExperiment(spec, test["id"], test["key"], ids))
    return out


class Simulation:
    """The users of one run, sent through one :class:`Device`."""

    def __init__(self, run: Run, device: Device, pacer: Pacer) -> None:
        self.run = run
        self.device = device
        self.pacer = pacer
        self.scenario = run.scenario

    # ---------------------------------------------------------------------------------------- sending

    async def _send(self, user: SimUser, path: str, body: Any, events: list[tuple[str, TruthEvent]]) -> None:
        """One ingestion request; its acknowledged events go to the truth."""
        b = self.scenario.behaviour
        await self.pacer.take(len(events))
        gzipped = user.rng.random() < b.gzip_share
        resend = user.rng.random() < b.retry_share
        ids = [event_id for event_id, _ in events]
        acked = await self.device.ingest(user.user_id, path, body, ids, gzipped=gzipped)
        truth = self.run.truth.user(user.user_id)
        for (event_id, ev), ok in zip(events, acked, strict=True):
            if ok:
                truth.events.setdefault(event_id, ev)
        if user.broken_clock:
            self.run.refused_expected += len(events)
        if resend and any(acked):  # the answer was "lost": the device sends the same request again
            self.run.ledger.resent_after_success += 1
            try:
                out = await self.device.request("POST", path, body, gzipped=gzipped)
            except GaveUp as exc:
                self.run.ledger.note_unexpected(str(exc))
                return
            self.device.settle(user.user_id, out, ids)

    def _v1_body(self, user: SimUser, session: Session, sent_ms: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "anonymous_user_id": user.user_id,
            "session_id": session.session_id,
            "platform": user.platform,
            "app_version": user.app_version,
            "events": [
                {
                    "event_name": ev.name,
                    "occurred_at": iso(ev.t_ms + user.clock_offset_ms),
                    "event_id": ev.event_id,
                    "properties": ev.properties,
                    "context": {"locale": "en-US", "network": "wifi"},
                }
                for ev in session.events
            ],
        }
        if user.sends_sent_at:
            body["sent_at"] = iso(sent_ms + user.clock_offset_ms)
        return body

    def _apiv1_event(self, user: SimUser, session_id: str, ev: Any, sent_ms: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_type": ev.name,
            "user_id": user.user_id,
            "session_id": session_id,
            "occurred_at": iso(ev.t_ms + user.clock_offset_ms),
            "event_id": ev.event_id,
            "properties": {**ev.properties, "platform": user.platform, "app_version": user.app_version},
        }
        if user.sends_sent_at:
            out["sent_at"] = iso(sent_ms + user.clock_offset_ms)
        return out

    async def _send_sessions(self, user: SimUser, sessions: list[Session], post: bool) -> None:
        if user.surface == "calicritters":
            for s in sessions:
                body = self._v1_body(user, s, now_ms())
                await self._send(user, "/v1/events", body,
                                 [(e.event_id, TruthEvent(e.name, e.t_ms, post, session=s.session_id))
                                  for e in s.events])  # fmt: skip
            return
        flat = [(s.session_id, e) for s in sessions for e in s.events]
        step = HISTORY_BATCH if not post else len(flat) or 1
        for i in range(0, len(flat), step):
            chunk = flat[i : i + step]
            sent = now_ms()
            truth = [(e.event_id, TruthEvent(e.name, e.t_ms, post, session=sid)) for sid, e in chunk]
            if len(chunk) == 1:
                await self._send(user, "/apiv1/events", self._apiv1_event(user, *chunk[0], sent), truth)
            else:
                body = [self._apiv1_event(user, sid, e, sent) for sid, e in chunk]
                await self._send(user, "/apiv1/events/batch", body, truth)

    # ------------------------------------------------------------------------------------------ a user

    async def _assign(self, user: SimUser) -> dict[int, int]:
        """The user's variants (experiment id -> variant id) as the gateway answered them."""
        variants: dict[int, int] = {}
        if user.surface == "calicritters":
            body = {"anonymous_user_id": user.user_id, "platform": user.platform, "app_version": user.app_version}
            out = await self.device.request("POST", "/v1/assignment", body)
            if out.status != 200:
                raise RuntimeError(f"/v1/assignment answered {out.status}: {out.body}")
            for entry in out.body["assignments"]:
                variants[entry["experiment_id"]] = entry["variant_id"]
        else:
            for exp in self.run.experiments:
                out = await self.device.request("POST", f"/apiv1/ab-tests/{exp.id}/assign", {"user_id": user.user_id})
                if out.status != 200:
                    raise RuntimeError(f"/apiv1/ab-tests/{exp.id}/assign answered {out.status}: {out.body}")
                if out.body.get("assigned"):
                    variants[exp.id] = out.body["variant_id"]
        self.run.truth.user(user.user_id).variants.update(variants)
        return variants

    def _multipliers(self, variants: dict[int, int]) -> Multipliers:
        sessions = conversion = revenue = 1.0
        for exp in self.run.experiments:
            name = exp.variant_name(variants.get(exp.id, -1))
            spec = next((v for v in exp.spec.variants if v.name == name), None)
            if spec is not None:
                sessions *= 1 + spec.effects.get("sessions", 0.0)
                conversion *= 1 + spec.effects.get("conversion", 0.0)
                revenue *= 1 + spec.effects.get("revenue", 0.0)
        return Multipliers(sessions, conversion, revenue)

    async def _purchase(self, user: SimUser, purchase: Purchase) -> None:
        await clear_of_midnight()
        ev = purchase.event
        ev.t_ms = now_ms()
        await self._send_sessions(user, [Session(f"checkout-{ev.event_id[:8]}", [ev])], post=True)
        for i, exp in enumerate(self.run.experiments):
            if exp.id not in self.run.truth.user(user.user_id).variants:
                continue
            event_id = purchase.track_ids[i]
            body = {"user_id": user.user_id, "metric_name": "revenue", "value": purchase.value, "event_id": event_id}
            truth = TruthEvent("revenue", now_ms(), True, tracked_for=exp.id, value=purchase.value)
            await self._send(user, f"/apiv1/ab-tests/{exp.id}/track", body, [(event_id, truth)])

    async def user(self, index: int) -> None:
        await clear_of_midnight()
        user = make_user(self.scenario, self.run.run_id, index)
        today = now_ms() // MS_PER_DAY
        await self._send_sessions(user, history(user, self.scenario, today), post=False)
        await clear_of_midnight()
        variants = await self._assign(user)
        sessions, purchase = test_period(user, self.scenario, self._multipliers(variants))
        late: list[Session] = []
        for s in sessions:
            await clear_of_midnight()
            sent = now_ms()
            for ev, spread in zip(s.events, s.spread_ms, strict=True):
                ev.t_ms = sent - spread
            if s.late:
                late.append(s)  # happened now, reaches us after the user's later sessions
            else:
                await self._send_sessions(user, [s], post=True)
        if purchase is not None:
            await self._purchase(user, purchase)
        await self._send_sessions(user, late, post=True)


async def simulate(
    scenario: Scenario,
    base_url: str,
    *,
    admin_token: str = "",
    run_id: str | None = None,
    retry_for_s: float = 300.0,
    stop: asyncio.Event | None = None,
    on_ack: Callable[[str, str, float], None] | None = None,
    on_progress: Callable[[Run], None] | None = None,
) -> Run:
    """Run the scenario against the gateway at ``base_url``; returns the ledger and the truth.

    ``stop`` (chaos) ends the run early: users not yet started are skipped, users in flight finish.
    """
    run = Run(scenario, run_id or uuid.uuid4().hex[:8], base_url.rstrip("/"))
    device = Device(run.base_url, run.ledger, admin_token=admin_token, concurrency=scenario.concurrency,
                    retry_for_s=retry_for_s, on_ack=on_ack)  # fmt: skip
    sim = Simulation(run, device, Pacer(scenario.rate))
    next_user = 0
    failures: list[BaseException] = []

    async def worker() -> None:
        nonlocal next_user
        while next_user < scenario.users and not (stop and stop.is_set()) and not failures:
            index, next_user = next_user, next_user + 1
            run.users_started += 1
            try:
                await sim.user(index)
            except Exception as exc:  # noqa: BLE001 - the first failure stops the run and is raised below
                failures.append(exc)
                return
            run.users_done += 1
            if on_progress is not None:
                on_progress(run)

    try:
        run.experiments = await create_experiments(device, scenario, run.run_id)
        run.started_at = time.time()
        await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    finally:
        run.finished_at = time.time()
        await device.close()
    if failures:
        raise failures[0]
    return run
