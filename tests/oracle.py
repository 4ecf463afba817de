"""An independent oracle for the rollups: the documented rules, applied naively to the raw rows.

``abstream verify`` replays the workers' own per-user code (stream_workers.rollups) over the stored rows, so
it proves that the streaming and the batch paths agree, not that either is right. This module shares none of
that code: it reads event_logs FINAL, assignments and the registry's definitions with plain SQL, decides
attribution itself from the assignment times (not from the enrichment stored on each row), and recomputes
every rollup with straightforward loops written from docs/stream-workers.md and docs/results.md. Sums of
floats use math.fsum. The tests compare its totals with the tables (read by ``actual_totals``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from schemas.experiments import load_manifest

DAY_MS = 86_400_000
_EPOCH = date(1970, 1, 1)


@dataclass
class Event:
    event_id: str
    name: str
    kind: str
    t: int  # event time, ms
    received: int
    platform: str
    app_version: str
    metric_experiment: int | None
    value: float | None

    @property
    def day(self) -> int:
        return self.t // DAY_MS


@dataclass
class FirstAssignment:
    experiment_id: int
    variant_id: int
    phase: int
    at: int  # ms


Phases = dict[str, dict[int, dict[int, FirstAssignment]]]  # user -> experiment -> phase -> its first assignment


def _load(settings: Settings) -> tuple[dict[str, list[Event]], dict[str, dict[int, FirstAssignment]], Phases,
                                       dict[int, Any]]:  # fmt: skip
    client = ch_client(settings)
    try:
        events: dict[str, list[Event]] = defaultdict(list)
        for row in client.query(
            "SELECT user_id, event_id, event_name, kind, toUnixTimestamp64Milli(event_time), "
            "toUnixTimestamp64Milli(received_at), platform, app_version, experiment_id, metric_value "
            "FROM event_logs FINAL"
        ).result_rows:
            events[row[0]].append(Event(*row[1:]))
        assigned: dict[str, dict[int, FirstAssignment]] = defaultdict(dict)
        phases: Phases = defaultdict(lambda: defaultdict(dict))
        for user, exp, variant, phase, at in client.query(
            "SELECT user_id, experiment_id, variant_id, phase, toUnixTimestamp64Milli(assigned_at) "
            "FROM assignments FINAL"
        ).result_rows:
            cur = assigned[user].get(exp)
            # the first assignment of the latest phase
            if cur is None or phase > cur.phase or (phase == cur.phase and at < cur.at):
                assigned[user][exp] = FirstAssignment(exp, variant, phase, at)
            # and of each phase
            first = phases[user][exp].get(phase)
            if first is None or at < first.at:
                phases[user][exp][phase] = FirstAssignment(exp, variant, phase, at)
        definitions = {
            int(exp_id): orjson.loads(definition)["experiment"]
            for exp_id, definition in client.query(
                "SELECT experiment_id, definition FROM experiments FINAL"
            ).result_rows
        }
    finally:
        client.close()
    return events, assigned, phases, definitions


def _amount(ev: Event, experiment_id: int) -> float | None:
    """What one event adds to experiment E's metric of its name: 1 per event, or a tracked value (E's only)."""
    if ev.kind == "metric":
        return (ev.value or 0.0) if ev.metric_experiment == experiment_id else None
    return 1.0


def _level(times_per_step: list[list[int]], window_ms: int) -> int:
    """Deepest step reached in order (non-decreasing times), all within window_ms of the first step."""
    best = 0
    for start in times_per_step[0] if times_per_step else []:
        level, current = 1, start
        for times in times_per_step[1:]:
            later = [t for t in times if current <= t <= start + window_ms]
            if not later:
                break
            current = min(later)
            level += 1
        best = max(best, level)
    return best


def expected_totals(settings: Settings) -> dict[tuple[Any, ...], list[float]]:
    events, assigned, phases, definitions = _load(settings)
    funnels = load_manifest(settings.manifest_file).funnels
    out: dict[tuple[Any, ...], list[Any]] = {}

    def add(key: tuple[Any, ...], values: list[float]) -> None:
        cur = out.setdefault(key, [[] for _ in values])
        for bucket, v in zip(cur, values, strict=True):
            bucket.append(v)

    all_users = set(events) | set(assigned)
    for user in all_users:
        evs = events.get(user, [])
        mine = assigned.get(user, {})
        # daily
        per_day: dict[tuple[int, str, str, str], int] = defaultdict(int)
        for ev in evs:
            per_day[(ev.day, ev.name, ev.platform, ev.app_version)] += 1
        totals: dict[tuple[int, str], int] = defaultdict(int)
        for (day, name, platform, version), n in per_day.items():
            add(("d", day, name, platform, version), [n, 1])
            totals[(day, name)] += n
        for (day, name), n in totals.items():
            add(("d", day, name, "*", "*"), [n, 1])
        if evs:
            add(("l", max(ev.day for ev in evs)), [1])
        for exp_id, a in mine.items():
            add(("e", exp_id, a.variant_id, a.at // DAY_MS), [1])
            attributed = [ev for ev in evs if ev.received >= a.at]  # the latest phase's
            # per-day metric rows: each event for the variant of the latest phase begun when it was received
            per_metric_day: dict[tuple[int, str, int], list[float]] = defaultdict(list)
            for ev in evs:
                begun = [f for f in phases[user][exp_id].values() if f.at <= ev.received]
                amount = _amount(ev, exp_id)
                if begun and amount is not None:
                    variant = max(begun, key=lambda f: f.phase).variant_id
                    per_metric_day[(variant, ev.name, ev.day)].append(amount)
            for (variant, name, day), amounts in per_metric_day.items():
                x = math.fsum(amounts)
                add(("m", exp_id, variant, name, day), [1, len(amounts), 1, x, x * x])
            _cumulative(user, a, evs, attributed, definitions.get(exp_id, {}), add)
        for funnel in funnels:
            window = funnel.conversion_window_seconds * 1000
            level = _level([[ev.t for ev in evs if ev.name == step] for step in funnel.steps], window)
            for step in range(1, level + 1):
                add(("f", funnel.key, 0, 0, step), [1])
            for exp_id, a in mine.items():
                key = definitions.get(exp_id, {}).get("key")
                if funnel.experiment_keys and key not in funnel.experiment_keys:
                    continue
                attributed = [ev for ev in evs if ev.received >= a.at and ev.kind == "event"]
                level = _level([[ev.t for ev in attributed if ev.name == step] for step in funnel.steps], window)
                for step in range(1, level + 1):
                    add(("f", funnel.key, exp_id, a.variant_id, step), [1])
    result = {}
    for key, buckets in out.items():
        values = [math.fsum(b) if any(isinstance(v, float) for v in b) else sum(b) for b in buckets]
        if any(values):
            result[key] = [float(v) for v in values]
    return result


def _cumulative(
    user: str, a: FirstAssignment, evs: list[Event], attributed: list[Event], definition: dict[str, Any], add: Any
) -> None:
    """The cumulative rollups of docs/results.md for one exposed user."""
    exp_id = a.experiment_id
    exposure_event = definition.get("exposure_event")
    lookback = definition.get("cuped_lookback_days", 14)
    if exposure_event is None:
        exposed_at = a.at
        counted = attributed
    else:
        seen = [ev.t for ev in attributed if ev.kind == "event" and ev.name == exposure_event]
        if not seen:
            return
        exposed_at = min(seen)
        counted = [ev for ev in attributed if ev.t >= exposed_at]
    add(("x", exp_id, a.phase, a.variant_id), [1])
    add(("xd", exp_id, a.phase, a.variant_id, exposed_at // DAY_MS), [1])

    def source_of(ev: Event) -> tuple[str, str] | None:
        if ev.kind == "metric":
            return ("tracked", ev.name) if ev.metric_experiment == exp_id else None
        return ("event", ev.name)

    def value_of(ev: Event) -> float:
        return (ev.value or 0.0) if ev.kind == "metric" else 1.0

    x: dict[tuple[str, str], list[float]] = defaultdict(list)
    for ev in counted:
        src = source_of(ev)
        if src is not None:
            x[src].append(value_of(ev))
    y: dict[tuple[str, str], list[float]] = defaultdict(list)
    if lookback > 0:
        last = exposed_at // DAY_MS
        counted_ids = {ev.event_id for ev in counted}
        for ev in evs:
            if last - lookback <= ev.day < last and ev.event_id not in counted_ids:
                src = source_of(ev)
                if src is not None:
                    y[src].append(value_of(ev))
    for src in set(x) | set(y):
        xs, ys = x.get(src, []), y.get(src, [])
        xv, yv = math.fsum(xs), math.fsum(ys)
        both = int(bool(xs) and bool(ys))
        add(("c", exp_id, a.phase, a.variant_id, src[0], src[1]),
            [int(bool(xs)), len(xs), xv, xv * xv, int(bool(ys)), yv, yv * yv, xv * yv, both, int(xv != 0)])  # fmt: skip
    metrics = {m["key"]: m for m in definition.get("metrics") or []}
    for m in metrics.values():
        if m["type"] != "ratio":
            continue
        parts = []
        for ref in (m["numerator"], m["denominator"]):
            part = metrics[ref]
            src = ("event", part["event"]) if part.get("event") else ("tracked", part["tracked"])
            values = x.get(src, [])
            if part["type"] == "proportion":
                parts.append(1.0 if values else 0.0)
            elif part["type"] == "count":
                parts.append(float(len(values)))
            else:
                parts.append(math.fsum(values))
        num, den = parts
        if num or den:
            add(("r", exp_id, a.phase, a.variant_id, m["key"]), [num, num * num, den, den * den, num * den])


def differences(expected: dict[tuple[Any, ...], list[float]], actual: dict[tuple[Any, ...], list[float]]) -> list[str]:
    out = []
    for key in sorted(set(expected) | set(actual), key=repr):
        e, a = expected.get(key), actual.get(key)
        same = (
            e is not None and a is not None and len(e) == len(a)
            and all(math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-6) for u, v in zip(e, a, strict=True))
        )  # fmt: skip
        if not same:
            out.append(f"{key}: oracle {e}, rollup {a}")
    return out
