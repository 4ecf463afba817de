"""The exact truth of a run (what the pipeline must show), and the true effects the scenario implies.

The truth holds only what the gateway acknowledged, each ``(user, event_id)`` once, whatever the retries: a
refused request or a rejected event is not in it. From it come the numbers the pipeline must reproduce
exactly: events per UTC day and name, exposed users per variant, each metric's per-user values (events
received from the assignment on, as ``docs/results.md`` defines them) and funnel steps reached.

The true effects are closed forms of the behaviour model (``population``), the population expectations a
fixed-horizon interval is meant to cover (see ``docs/loadgen.md``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from abstream.loadgen.population import MS_PER_DAY
from abstream.loadgen.scenario import ExperimentSpec, Scenario, VariantSpec

FUNNEL_EVENTS = ("app_open", "workout_started", "session_submitted")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric loadgen defines on each experiment it creates (``POST /apiv1/ab-tests`` ``metrics``)."""

    key: str
    type: Literal["proportion", "count", "sum", "ratio"]
    event: str | None = None
    tracked: str | None = None
    numerator: str | None = None
    denominator: str | None = None

    def definition(self) -> dict[str, str]:
        return {k: v for k, v in (("key", self.key), ("type", self.type), ("event", self.event),
                                  ("tracked", self.tracked), ("numerator", self.numerator),
                                  ("denominator", self.denominator)) if v is not None}  # fmt: skip


METRICS = (
    MetricSpec("opens", "count", event="app_open"),
    MetricSpec("workouts", "count", event="workout_started"),
    MetricSpec("bought", "proportion", event="purchase_completed"),
    MetricSpec("revenue", "sum", tracked="revenue"),
    MetricSpec("revenue_per_open", "ratio", numerator="revenue", denominator="opens"),
)
BY_KEY = {m.key: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class TruthEvent:
    name: str
    t_ms: int  # the time the pipeline stores for it (true time; skewed clocks are corrected by the gateway)
    post: bool  # sent after the user's assignments were answered
    tracked_for: int | None = None  # experiment id of a tracked value
    value: float = 0.0
    session: str = ""


@dataclass
class UserTruth:
    variants: dict[int, int] = field(default_factory=dict)  # experiment id -> variant id
    events: dict[str, TruthEvent] = field(default_factory=dict)  # event_id -> the acknowledged event


@dataclass
class Truth:
    users: dict[str, UserTruth] = field(default_factory=dict)

    def user(self, user_id: str) -> UserTruth:
        found = self.users.get(user_id)
        if found is None:
            found = self.users[user_id] = UserTruth()
        return found

    def events(self) -> int:
        return sum(len(u.events) for u in self.users.values())

    def daily(self) -> Counter[tuple[int, str]]:
        """Events per (UTC day number, event or tracked metric name)."""
        out: Counter[tuple[int, str]] = Counter()
        for u in self.users.values():
            for ev in u.events.values():
                out[(ev.t_ms // MS_PER_DAY, ev.name)] += 1
        return out

    def exposed(self, experiment_id: int) -> Counter[int]:
        return Counter(u.variants[experiment_id] for u in self.users.values() if experiment_id in u.variants)

    def values(self, experiment_id: int, metric: MetricSpec) -> dict[int, list[tuple[float, float]]]:
        """Per variant, each exposed user's (numerator, denominator) of the metric: (x, 1) unless a ratio."""
        out: dict[int, list[tuple[float, float]]] = {}
        for u in self.users.values():
            variant = u.variants.get(experiment_id)
            if variant is None:
                continue
            if metric.type == "ratio":
                assert metric.numerator and metric.denominator  # noqa: S101 - METRICS defines both
                num = _user_value(u, experiment_id, BY_KEY[metric.numerator])
                den = _user_value(u, experiment_id, BY_KEY[metric.denominator])
                out.setdefault(variant, []).append((num, den))
            else:
                out.setdefault(variant, []).append((_user_value(u, experiment_id, metric), 1.0))
        return out

    def funnel(self, steps: tuple[str, ...], window_ms: int, experiment_id: int = 0) -> Counter[tuple[int, int]]:
        """Users who reached each step, as (variant id (0: everyone), step) -> users. Per variant, only the
        events received from the assignment on count, as for metrics."""
        out: Counter[tuple[int, int]] = Counter()
        for u in self.users.values():
            if experiment_id:
                if experiment_id not in u.variants:
                    continue
                variant = u.variants[experiment_id]
                times = [sorted(e.t_ms for e in u.events.values() if e.name == s and e.post) for s in steps]
            else:
                variant = 0
                times = [sorted(e.t_ms for e in u.events.values() if e.name == s) for s in steps]
            for step in range(1, reached(times, window_ms) + 1):
                out[(variant, step)] += 1
        return out


def _user_value(u: UserTruth, experiment_id: int, metric: MetricSpec) -> float:
    if metric.tracked is not None:
        return sum(e.value for e in u.events.values() if e.tracked_for == experiment_id and e.name == metric.tracked)
    n = sum(1 for e in u.events.values() if e.post and e.tracked_for is None and e.name == metric.event)
    return float(n > 0) if metric.type == "proportion" else float(n)


def reached(times: list[list[int]], window_ms: int) -> int:
    """The deepest step reached in order within window_ms of a first-step event, by trying every start."""
    best = 0
    for start in times[0] if times else ():
        level, cur = 1, start
        for later in times[1:]:
            nxt = next((t for t in later if cur <= t <= start + window_ms), None)
            if nxt is None:
                break
            level, cur = level + 1, nxt
        best = max(best, level)
    return best


# ------------------------------------------------------------------------------------------ true effects


def _factor(exp: ExperimentSpec, variant: VariantSpec, what: tuple[str, ...]) -> float:
    out = 1.0
    for w in what:
        out *= 1 + variant.effects.get(w, 0.0)  # type: ignore[call-overload]
    return out


def _others(scenario: Scenario, exp: ExperimentSpec, what: tuple[str, ...]) -> float:
    """E over the user's other experiments (drawn independently, by weight) of their joint multiplier."""
    out = 1.0
    for other in scenario.experiments:
        if other is not exp:
            out *= sum(other.share(v) * _factor(other, v, what) for v in other.variants)
    return out


def expected_mean(scenario: Scenario, exp: ExperimentSpec, variant: VariantSpec, metric: MetricSpec) -> float:
    """E[metric per exposed user | variant]; for a ratio, E[numerator] / E[denominator]."""
    b = scenario.behaviour
    keep = 1 - b.broken_clock_share  # a broken clock's every event is refused: its user counts as zero
    if metric.type == "ratio":
        assert metric.numerator and metric.denominator  # noqa: S101
        num = expected_mean(scenario, exp, variant, BY_KEY[metric.numerator])
        den = expected_mean(scenario, exp, variant, BY_KEY[metric.denominator])
        return num / den
    opens = keep * b.sessions_per_day * b.test_sessions
    if metric.key == "opens":
        return opens * _factor(exp, variant, ("sessions",)) * _others(scenario, exp, ("sessions",))
    if metric.key == "workouts":
        return b.workout_share * opens * _factor(exp, variant, ("sessions",)) * _others(scenario, exp, ("sessions",))
    if metric.key == "bought":
        return (
            keep * b.purchase_share * _factor(exp, variant, ("conversion",)) * _others(scenario, exp, ("conversion",))
        )
    if metric.key == "revenue":
        both = ("conversion", "revenue")
        return keep * b.purchase_share * b.revenue_mean * _factor(exp, variant, both) * _others(scenario, exp, both)
    raise KeyError(metric.key)


def true_effect(scenario: Scenario, exp: ExperimentSpec, variant: VariantSpec, metric: MetricSpec) -> float:
    """The population difference of the metric, variant minus control (absolute)."""
    return expected_mean(scenario, exp, variant, metric) - expected_mean(scenario, exp, exp.control, metric)
