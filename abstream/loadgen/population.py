"""The simulated users: who each one is and what they do, drawn from a generator seeded by (seed, run, user).

A user's draws depend only on the scenario's seed, the run id and the user's index (and, for the test period,
on the variants the gateway assigned), never on timing or on the order users run in, so a run is reproducible.

The behaviour model (its expectations are in :mod:`abstream.loadgen.truth`):

- activity λ ~ Gamma(shape, mean/shape) sessions a day; the same λ drives the history and the test period,
  which is what gives CUPED a covariate;
- history: Poisson(λ) sessions on each of the ``days`` UTC days before today, sent before the assignment
  (a backfill, as an SDK flushing an offline queue);
- test period: Poisson(λ · test_sessions · Π(1 + sessions effect)) sessions, sent in real time after the
  assignment; a session is ``app_open``, then ``workout_started`` (workout_share), then
  ``session_submitted`` (submit_share): a funnel with drop-off;
- a purchase (``purchase_completed``, and its value tracked per experiment) with probability
  purchase_share · Π(1 + conversion effect); the value is log-normal with mean revenue_mean · Π(1 + revenue effect).
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Literal

from abstream.loadgen.scenario import Scenario

MS_PER_DAY = 86_400_000
MIDNIGHT_GUARD_MS = 20_000
"""No simulated time lies this close to a UTC midnight, so the day of every event is certain even after the
gateway corrects a skewed clock by a request's latency."""

PLATFORMS = ("ios", "android")
APP_VERSIONS = ("2.3.0", "2.3.1", "2.4.0", "2.2.7")
SCREENS = ("home", "workout_list", "workout_player", "creature_detail", "shop")

Surface = Literal["calicritters", "arkforge"]


@dataclass(slots=True)
class SimEvent:
    name: str
    event_id: str
    t_ms: int = 0  # true time (UTC epoch ms); test-period events are stamped when their session is sent
    properties: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class Session:
    session_id: str
    events: list[SimEvent]
    spread_ms: list[int] = field(default_factory=list)  # test period: each event's distance before the send
    late: bool = False


@dataclass(slots=True)
class Purchase:
    event: SimEvent
    value: float
    track_ids: dict[int, str]  # experiment index in the scenario -> event_id of its tracked value


@dataclass(slots=True)
class SimUser:
    index: int
    user_id: str
    surface: Surface
    platform: str
    app_version: str
    activity: float
    clock_offset_ms: int  # device clock minus true time
    broken_clock: bool
    rng: random.Random

    @property
    def sends_sent_at(self) -> bool:
        """Skewed devices send sent_at (so the gateway can correct them); others do on /v1 half the time."""
        return self.clock_offset_ms != 0


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method; λ here is a few sessions, far below where it gets slow or underflows."""
    if lam <= 0:
        return 0
    if lam > 500:  # a normal approximation for absurd scenario values, never reached by the shipped ones
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_user(scenario: Scenario, run_id: str, index: int) -> SimUser:
    rng = random.Random(f"{scenario.seed}:{run_id}:{index}")  # str seeds hash with SHA-512: stable across runs
    b = scenario.behaviour
    surface: Surface = "arkforge" if rng.random() < b.arkforge_share else "calicritters"
    platform = rng.choice(PLATFORMS)
    version = rng.choice(APP_VERSIONS)
    activity = rng.gammavariate(b.activity_shape, b.sessions_per_day / b.activity_shape)
    broken = rng.random() < b.broken_clock_share
    offset = 0
    if broken:
        offset = 3_600_000  # an hour fast: beyond ABSTREAM_MAX_FUTURE_SKEW_S, every event is refused
    elif rng.random() < b.skewed_share:
        offset = rng.randint(-7_200_000, -60_000) if rng.random() < 0.7 else rng.randint(60_000, 240_000)
    return SimUser(index, f"lg-{run_id}-{index:07d}", surface, platform, version, activity, offset, broken, rng)


def _clear_of_midnight(t_ms: int) -> int:
    into_day = t_ms % MS_PER_DAY
    if into_day < MIDNIGHT_GUARD_MS:
        return t_ms + MIDNIGHT_GUARD_MS - into_day
    if into_day > MS_PER_DAY - MIDNIGHT_GUARD_MS:
        return t_ms - (into_day - (MS_PER_DAY - MIDNIGHT_GUARD_MS))
    return t_ms


def _session_events(user: SimUser, scenario: Scenario) -> tuple[list[SimEvent], list[int]]:
    """One session's events and their offsets (ms) from its start: the funnel with its drop-off."""
    rng, b = user.rng, scenario.behaviour
    screen = rng.choice(SCREENS)
    events = [SimEvent("app_open", _uuid(rng), properties={"screen": screen, "platform": user.platform})]
    offsets = [0]
    if rng.random() < b.workout_share:
        workout = f"w_{rng.randint(1, 400):04d}"
        events.append(SimEvent("workout_started", _uuid(rng), properties={"workout_id": workout}))
        offsets.append(rng.randint(5_000, 120_000))
        if rng.random() < b.submit_share:
            events.append(SimEvent("session_submitted", _uuid(rng), properties={"workout_id": workout}))
            offsets.append(offsets[-1] + rng.randint(60_000, 1_800_000))
    return events, offsets


def history(user: SimUser, scenario: Scenario, today: int) -> list[Session]:
    """Sessions on each of the ``days`` UTC days before ``today`` (a day number), true times set."""
    rng = user.rng
    sessions: list[Session] = []
    for days_ago in range(scenario.days, 0, -1):
        day_start = (today - days_ago) * MS_PER_DAY
        for _ in range(poisson(rng, user.activity)):
            events, offsets = _session_events(user, scenario)
            latest_start = MS_PER_DAY - MIDNIGHT_GUARD_MS - offsets[-1]
            start = day_start + rng.randint(MIDNIGHT_GUARD_MS, max(MIDNIGHT_GUARD_MS, latest_start))
            for ev, off in zip(events, offsets, strict=True):
                ev.t_ms = _clear_of_midnight(start + off)
            sessions.append(Session(_uuid(rng), events))
    if scenario.days and rng.random() < scenario.behaviour.history_purchase_share:
        day = today - rng.randint(1, scenario.days)
        t = day * MS_PER_DAY + rng.randint(MIDNIGHT_GUARD_MS, MS_PER_DAY - MIDNIGHT_GUARD_MS)
        sessions.append(Session(_uuid(rng), [SimEvent("purchase_completed", _uuid(rng), t, {"sku": "gems_100"})]))
    sessions.sort(key=lambda s: s.events[0].t_ms)
    return sessions


@dataclass(frozen=True, slots=True)
class Multipliers:
    """What the user's variants do to each behaviour: the product over experiments of (1 + effect)."""

    sessions: float = 1.0
    conversion: float = 1.0
    revenue: float = 1.0


def test_period(user: SimUser, scenario: Scenario, mult: Multipliers) -> tuple[list[Session], Purchase | None]:
    """The sessions after the assignment (times stamped at sending) and the purchase, if any."""
    rng, b = user.rng, scenario.behaviour
    sessions: list[Session] = []
    for _ in range(poisson(rng, user.activity * b.test_sessions * mult.sessions)):
        events, offsets = _session_events(user, scenario)
        # compressed in real time: a session's events are spread over its last few hundred milliseconds
        spread = [(offsets[-1] - off) // 2000 for off in offsets]
        sessions.append(Session(_uuid(rng), events, spread, late=rng.random() < b.late_share))
    purchase = None
    # drawn whatever the outcome, so whether a user buys never shifts the draws that follow
    buys = rng.random() < b.purchase_share * mult.conversion
    mean = b.revenue_mean * mult.revenue
    value = rng.lognormvariate(math.log(mean) - b.revenue_sigma**2 / 2, b.revenue_sigma)
    purchase_id, track_seed = _uuid(rng), rng.getrandbits(64)
    if buys and not user.broken_clock:  # a broken device's checkout never reaches us either
        ids = random.Random(track_seed)
        track_ids = {i: _uuid(ids) for i in range(len(scenario.experiments))}
        purchase = Purchase(
            SimEvent("purchase_completed", purchase_id, properties={"sku": "gems_500"}), value, track_ids
        )
    return sessions, purchase
