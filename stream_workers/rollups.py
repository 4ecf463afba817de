"""Where a rollup is computed: each user's contribution to every rollup, as one pure function.

The stream keeps a ``UserState`` per user and, whenever a user changes, subtracts the user's previous
contribution from the partition's totals and adds the new one (``Totals.replace``). ``abstream verify``
rebuilds the same ``UserState`` objects from ClickHouse (event_logs FINAL + assignments) and sums the
same ``contribution`` from scratch. Both paths share this module, so "the rollups equal the aggregate
recomputed from the raw log" holds by construction, and a difference means lost or doubled data.

Rules (also in docs/stream-workers.md):
* day = UTC date of the event time (the skew-corrected time when the client sent ``sent_at``).
* An event counts for experiment E when the event was enriched with the user's assignment to E: the
  first assignment of the latest phase of E that had begun for the user when the event was received.
  Per-day metric rows count it for that assignment's variant; the cumulative rollups and the funnels per
  variant count only the events of the user's current phase.
* experiment metric value x of a user for (metric, day): the number of events with that name that day,
  or for tracked metrics (/apiv1/ab-tests/{id}/track, counted for that test only) the sum of values.
* cumulative experiment rollups (what results read): per experiment, phase, variant and source (an event
  name, or a metric tracked for that experiment) over the variant's *exposed* users. Exposure is the
  user's first assignment, or with an ``exposure_event`` the first such event attributed to the
  experiment. x = the user's events (count; tracked: value sum) attributed to the experiment, from the
  exposure on; y (the CUPED covariate) = the same source over the ``cuped_lookback_days`` whole UTC
  days before the exposure day, less what x already counts. Ratio metrics also keep Σx·y of their
  numerator and denominator values per user.
* funnel: a user reaches step k when events of steps 1..k happen in that order (non-decreasing time)
  with the k-th no later than ``conversion_window_seconds`` after the first. For all users (id 0) over
  all their events; per experiment/variant the user is assigned to (all experiments, or the funnel's
  ``experiment_keys``) over the events attributed to it, as metrics count them.
* last active day: each user counts once, on the UTC day of their latest event, so the users active on
  or after day D are the sum of the rows from D on (the metrics summary's 7- and 30-day actives).
* daily: per day, event name, platform and app version: events and unique users; the rows with
  platform '*' and app_version '*' are the totals over all platforms and versions ('' = not sent).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.analysis import DEFAULT_RULES, ExperimentRules, RatioPart
from schemas.events import METRIC_VALUE_MAX
from schemas.experiments import Funnel

MS_PER_DAY = 86_400_000
ALL = "*"  # platform/app_version of the daily rows that total over all platforms and versions

# Totals keys: ("m", exp, variant, metric, day) -> [users_with_metric, event_count, n, sum_x, sum_x2]
#              ("e", exp, variant, day)         -> [users]
#              ("f", funnel, exp, variant, step) -> [users]
#              ("d", day, event_name, platform, app_version) -> [events, unique_users]
#              ("x", exp, phase, variant)       -> [exposed users]
#              ("xd", exp, phase, variant, exposure day) -> [exposed users]
#              ("c", exp, phase, variant, source, name) -> [users_with_metric, event_count, sum_x, sum_x2,
#                                                   users_with_pre, sum_y, sum_y2, sum_xy, users_with_both,
#                                                   users_nonzero]
#              ("r", exp, phase, variant, ratio metric key) -> [sum_x, sum_x2, sum_y, sum_y2, sum_xy]
#              ("l", day)                       -> [users whose latest event is on that day]
Key = tuple[Any, ...]
Stats = list[float]


@dataclass(frozen=True, slots=True)
class FunnelSpec:
    key: str
    steps: tuple[str, ...]
    window_ms: int
    experiment_keys: frozenset[str]


class Funnels:
    """The manifest's funnels, indexed by event name so counting an event costs one dict lookup."""

    def __init__(self, funnels: Iterable[Funnel]) -> None:
        self.by_key: dict[str, FunnelSpec] = {
            f.key: FunnelSpec(f.key, tuple(f.steps), f.conversion_window_seconds * 1000,
                              frozenset(f.experiment_keys or ()))
            for f in funnels
        }  # fmt: skip
        self.steps_by_name: dict[str, list[tuple[str, int, int]]] = {}
        for spec in self.by_key.values():
            for i, name in enumerate(spec.steps):
                self.steps_by_name.setdefault(name, []).append((spec.key, len(spec.steps), i))


@dataclass(slots=True)
class Assignment:
    experiment_id: int
    experiment_key: str
    variant_id: int
    variant_key: str
    phase: int
    assigned_at_ms: int
    assignment_version: str

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "experiment_key": self.experiment_key,
            "variant_id": self.variant_id,
            "variant_key": self.variant_key,
            "phase": self.phase,
            "assigned_at_ms": self.assigned_at_ms,
        }


@dataclass(slots=True)
class UserEvent:
    """What the rollups need of one stored event."""

    event_id: str
    event_name: str
    kind: str
    event_time_ms: int
    received_at_ms: int
    platform: str
    app_version: str
    metric_experiment_id: int | None
    value: float | None
    attribution: tuple[tuple[int, int, int], ...]  # (experiment_id, variant_id, phase) it was enriched with

    @property
    def day(self) -> int:
        return self.event_time_ms // MS_PER_DAY


@dataclass(slots=True)
class UserState:
    """One user's assignments and the summaries of their stored events."""

    assignments: dict[int, Assignment] = field(default_factory=dict)  # the first of the latest phase
    # experiment_id -> phase -> the first assignment of that phase (what events received then are attributed to)
    phases: dict[int, dict[int, Assignment]] = field(default_factory=dict)
    # (day, event_name, platform, app_version) -> events
    daily: dict[tuple[int, str, str, str], int] = field(default_factory=dict)
    # (experiment_id, variant_id, phase, source experiment (0: events), name, day) -> [event_count, value]
    attributed: dict[tuple[int, int, int, int, str, int], list[float]] = field(default_factory=dict)
    # (experiment_id, variant_id, phase, source experiment, name) -> sorted (event time, value)
    attributed_times: dict[tuple[int, int, int, int, str], list[tuple[int, float]]] = field(default_factory=dict)
    # (source experiment (0: events), name, day) -> [event_count, value]: every event, for CUPED covariates
    by_day: dict[tuple[int, str, int], list[float]] = field(default_factory=dict)
    # funnel key -> per step: sorted event times
    funnel_times: dict[str, list[list[int]]] = field(default_factory=dict)

    def attribution_for(self, received_at_ms: int) -> tuple[Assignment, ...]:
        """The enrichment rule: per experiment, the first assignment of the latest phase that had begun for this
        user when the event was received (made at or before it). An event received in phase 1 stays phase 1's,
        whenever the worker reads it, before or after the phase-2 assignment."""
        out = []
        for exp_id in sorted(self.phases):
            began = [a for a in self.phases[exp_id].values() if a.assigned_at_ms <= received_at_ms]
            if began:
                out.append(max(began, key=lambda a: a.phase))
        return tuple(out)

    def add_event(self, ev: UserEvent, funnels: Funnels, sign: int = 1) -> None:
        """Count (sign=1) or uncount (sign=-1) one event in the summaries."""
        day = ev.day
        dkey = (day, ev.event_name, ev.platform, ev.app_version)
        n = self.daily.get(dkey, 0) + sign
        if n:
            self.daily[dkey] = n
        else:
            self.daily.pop(dkey, None)
        if ev.kind == "metric":
            src = ev.metric_experiment_id or 0
            amount = ev.value or 0.0
            if not -METRIC_VALUE_MAX <= amount <= METRIC_VALUE_MAX:  # also NaN: only a record that bypassed
                amount = 0.0  # the gateway holds one; counted as an event, its value is no number a sum keeps
        else:
            src = 0
            amount = 1
        name = ev.event_name
        _bump(self.by_day, (src, name, day), sign, amount)
        for exp_id, variant_id, phase in ev.attribution:
            if ev.kind == "metric" and src != exp_id:
                continue
            _bump(self.attributed, (exp_id, variant_id, phase, src, name, day), sign, amount)
            tkey = (exp_id, variant_id, phase, src, name)
            times = self.attributed_times.get(tkey)
            if sign > 0:
                if times is None:
                    times = self.attributed_times[tkey] = []
                insort(times, (ev.event_time_ms, amount))
            elif times is not None:
                pos = bisect_left(times, (ev.event_time_ms, amount))
                if pos < len(times) and times[pos] == (ev.event_time_ms, amount):
                    times.pop(pos)
                if not times:
                    del self.attributed_times[tkey]
        hits = funnels.steps_by_name.get(ev.event_name)
        if hits:
            t = ev.event_time_ms
            for key, n_steps, i in hits:
                times = self.funnel_times.get(key)
                if times is None:
                    times = self.funnel_times[key] = [[] for _ in range(n_steps)]
                lst = times[i]
                if sign > 0:
                    insort(lst, t)
                else:
                    pos = bisect_left(lst, t)
                    if pos < len(lst) and lst[pos] == t:
                        lst.pop(pos)


def _bump(summary: dict[Any, list[float]], key: Any, sign: int, amount: float) -> None:
    acc = summary.get(key)
    if acc is None:
        acc = summary[key] = [0, 0 if type(amount) is int else 0.0]
    acc[0] += sign
    acc[1] += sign * amount
    if acc[0] == 0:
        del summary[key]


def funnel_level(times: list[list[int]], window_ms: int) -> int:
    """Deepest step reached in order (non-decreasing times) within window_ms of the first step."""
    if not times or not times[0]:
        return 0
    best = 1
    n = len(times)
    for start in times[0]:
        level, cur = 1, start
        limit = start + window_ms
        for step in range(1, n):
            lst = times[step]
            pos = bisect_left(lst, cur)
            if pos == len(lst) or lst[pos] > limit:
                break
            cur = lst[pos]
            level = step + 1
        if level > best:
            best = level
            if best == n:
                break
    return best


RulesLookup = Mapping[int, ExperimentRules]


def contribution(user: UserState, funnels: Funnels, rules: RulesLookup | None = None) -> dict[Key, Stats]:
    """This user's share of every rollup total (see module docstring for the rules)."""
    out: dict[Key, Stats] = {}
    per_day: dict[tuple[int, int, str, int], list[float]] = {}
    for (exp_id, variant_id, _phase, _src, metric, day), (count, value) in user.attributed.items():
        if count <= 0:
            continue
        acc = per_day.get((exp_id, variant_id, metric, day))
        if acc is None:
            per_day[(exp_id, variant_id, metric, day)] = [count, float(value)]
        else:  # an event name that is also a metric tracked for this experiment: one row, as before
            acc[0] += count
            acc[1] += float(value)
    for (exp_id, variant_id, metric, day), (count, x) in per_day.items():
        out[("m", exp_id, variant_id, metric, day)] = [1, count, 1, x, x * x]
    for exp_id, a in user.assignments.items():
        _cumulative(user, a, (rules or {}).get(exp_id, DEFAULT_RULES), out)
    for exp_id, a in user.assignments.items():
        out[("e", exp_id, a.variant_id, a.assigned_at_ms // MS_PER_DAY)] = [1]
    totals_by_day: dict[tuple[int, str], int] = {}
    for (day, name, platform, version), count in user.daily.items():
        out[("d", day, name, platform, version)] = [count, 1]
        totals_by_day[(day, name)] = totals_by_day.get((day, name), 0) + count
    for (day, name), count in totals_by_day.items():
        out[("d", day, name, ALL, ALL)] = [count, 1]
    if user.daily:  # the user's last active day (events by UTC day): users active since D add up over days >= D
        out[("l", max(day for day, _, _, _ in user.daily))] = [1]
    for key, times in user.funnel_times.items():
        spec = funnels.by_key.get(key)
        if spec is None:
            continue
        level = funnel_level(times, spec.window_ms)
        if level == 0:
            continue
        for step in range(1, level + 1):
            out[("f", key, 0, 0, step)] = [1]
        for exp_id, a in user.assignments.items():
            if spec.experiment_keys and a.experiment_key not in spec.experiment_keys:
                continue
            # per variant, the steps count only events attributed to it in the current phase, as metrics do
            attributed = [
                [t for t, _ in user.attributed_times.get((exp_id, a.variant_id, a.phase, 0, name), ())]
                for name in spec.steps
            ]
            for step in range(1, funnel_level(attributed, spec.window_ms) + 1):
                out[("f", key, exp_id, a.variant_id, step)] = [1]
    return out


def _cumulative(user: UserState, a: Assignment, rules: ExperimentRules, out: dict[Key, Stats]) -> None:
    """The user's share of experiment a's cumulative rollups ("x", "c", "r" keys), if the user is exposed."""
    exp_id, variant_id, phase = a.experiment_id, a.variant_id, a.phase
    # x per source: [count, value] from the exposure on (events attributed to this phase's assignment)
    x: dict[tuple[int, str], list[float]] = {}
    if rules.exposure_event is None:
        exposed_at = a.assigned_at_ms
        for (e, v, p, src, name, _day), (count, value) in user.attributed.items():
            if e == exp_id and v == variant_id and p == phase and count > 0:
                _add(x, (src, name), count, value)
    else:
        first = user.attributed_times.get((exp_id, variant_id, phase, 0, rules.exposure_event))
        if not first:
            return  # not exposed (yet)
        exposed_at = first[0][0]
        for (e, v, p, src, name), times in user.attributed_times.items():
            if e == exp_id and v == variant_id and p == phase:
                for _t, value in times[bisect_left(times, (exposed_at, -math.inf)) :]:
                    _add(x, (src, name), 1, value)
    out[("x", exp_id, phase, variant_id)] = [1]
    out[("xd", exp_id, phase, variant_id, exposed_at // MS_PER_DAY)] = [1]
    # y per source: the lookback days before the exposure day, less what x counts on those days
    y: dict[tuple[int, str], list[float]] = {}
    if rules.lookback_days > 0:
        last = exposed_at // MS_PER_DAY
        first_day = last - rules.lookback_days
        for (src, name, day), (count, value) in user.by_day.items():
            if first_day <= day < last and (src == 0 or src == exp_id):
                _add(y, (src, name), count, value)
        if rules.exposure_event is None:
            for (e, v, p, src, name, day), (count, value) in user.attributed.items():
                if e == exp_id and v == variant_id and p == phase and first_day <= day < last:
                    _add(y, (src, name), -count, -value)
    for source in x.keys() | y.keys():
        xc, xv = x.get(source, (0, 0))
        yc, yv = y.get(source, (0, 0))
        if xc <= 0 and yc <= 0:
            continue
        src, name = source
        if src:  # tracked values: float sums
            xv, yv = float(xv), float(yv)
        out[("c", exp_id, phase, variant_id, "tracked" if src else "event", name)] = [
            int(xc > 0), xc, xv, xv * xv, int(yc > 0), yv, yv * yv, xv * yv, int(xc > 0 and yc > 0), int(xv != 0)
        ]  # fmt: skip
    for ratio in rules.ratios:
        num = _part_value(ratio.numerator, exp_id, x)
        den = _part_value(ratio.denominator, exp_id, x)
        if num or den:
            out[("r", exp_id, phase, variant_id, ratio.key)] = [num, num * num, den, den * den, num * den]


def _add(acc: dict[tuple[int, str], list[float]], key: tuple[int, str], count: float, value: float) -> None:
    cur = acc.get(key)
    if cur is None:
        acc[key] = [count, value]
    else:
        cur[0] += count
        cur[1] += value


def _part_value(part: RatioPart, exp_id: int, x: dict[tuple[int, str], list[float]]) -> float:
    """A ratio's numerator or denominator value for one user, from the user's x per source."""
    count, value = x.get((0 if part.source_kind == "event" else exp_id, part.name), (0, 0))
    if part.type == "proportion":
        return 1.0 if count > 0 else 0.0
    return float(count if part.type == "count" else value)


_UNIT_EXP = 1074
_UNIT = 1 << _UNIT_EXP
"""Float components of the totals are kept as integers in units of 2^-1074, the smallest positive double:
every finite double is a whole number of these units, so adding and subtracting them is exact."""


def _units(x: float) -> int:
    numerator, denominator = x.as_integer_ratio()  # the denominator is a power of two, at most 2^1074
    return numerator << (_UNIT_EXP + 1 - denominator.bit_length())


class Totals:
    """Per-partition totals of every rollup key, maintained by replacing users' contributions.

    Exact, whatever the order of the replacements: float components (a metric's sum_x and sum_x2) are
    accumulated as whole units of 2^-1074 and rounded to a float only when read. In floats, a small user's
    square next to a huge one is absorbed and lost for good once the huge one is subtracted (9e15 tracked
    then -9e15, next to another user's 5: sum_x2 0 instead of 25); ``abstream verify``, which sums the final
    contributions from scratch, would then disagree forever.
    """

    def __init__(self) -> None:
        self._exact: dict[Key, list[int]] = {}
        self._float_fields: dict[Key, tuple[int, ...]] = {}
        self.dirty: set[Key] = set()

    def replace(self, old: Mapping[Key, Stats], new: Mapping[Key, Stats]) -> None:
        for key, stats in old.items():
            if new.get(key) != stats:
                self._accumulate(key, stats, -1)
        for key, stats in new.items():
            if old.get(key) != stats:
                self._accumulate(key, stats, 1)

    def _accumulate(self, key: Key, stats: Stats, sign: int) -> None:
        cur = self._exact.get(key) if sign > 0 else self._exact[key]  # a contribution taken out was added first
        if cur is None:
            cur = self._exact[key] = [0] * len(stats)
            floats = tuple(i for i, v in enumerate(stats) if type(v) is not int)
            if floats:
                self._float_fields[key] = floats
        if key in self._float_fields:
            for i, v in enumerate(stats):
                cur[i] += sign * (v if type(v) is int else _units(v))
        else:
            for i, v in enumerate(stats):
                cur[i] += sign * v
        self.dirty.add(key)

    def add(self, contrib: Mapping[Key, Stats]) -> None:
        self.replace({}, contrib)

    def keys(self) -> set[Key]:
        return set(self._exact)

    def get(self, key: Key) -> Stats | None:
        """The key's totals, float components correctly rounded from their exact sums; None if never seen."""
        return self._rounded(key) if key in self._exact else None

    def _rounded(self, key: Key) -> Stats:
        cur = self._exact[key]
        out: Stats = list(cur)
        for i in self._float_fields.get(key, ()):
            out[i] = cur[i] / _UNIT  # int / int: correctly rounded
        return out

    def items(self) -> list[tuple[Key, Stats]]:
        return [(key, self._rounded(key)) for key in self._exact]

    def take_dirty(self) -> list[tuple[Key, Stats]]:
        rows = [(key, self._rounded(key)) for key in self.dirty]
        self.dirty = set()
        return rows
