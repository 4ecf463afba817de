"""The rollup arithmetic of the workers (stream_workers.rollups), without a stack.

The stream maintains totals by replacing users' contributions one change at a time; ``abstream verify``
sums the final contributions from scratch. These must agree exactly, whatever the history.
"""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from stream_workers.rollups import Assignment, Funnels, Totals, UserEvent, UserState, contribution

KEY = ("m", 3, 3001, "revenue", 20_000)


def metric(count: int, x: float) -> dict[tuple[object, ...], list[float]]:
    return {KEY: [1, count, 1, x, x * x]}


def test_a_huge_value_subtracted_later_does_not_take_a_small_one_with_it() -> None:
    """User A tracks 9e15 then -9e15 (within the gateway's 2^53 bound) next to user B's 5: sum_x2 stays 25."""
    totals = Totals()
    totals.add(metric(1, 5.0))
    totals.add(metric(1, 9e15))
    totals.replace(metric(1, 9e15), metric(2, 0.0))
    assert totals.take_dirty() == [(KEY, [2, 3, 2, 5.0, 25.0])]
    assert totals.take_dirty() == []


def test_any_history_of_replacements_ends_at_the_from_scratch_sum() -> None:
    rng = random.Random(7)
    scales = [1e-3, 0.1, 1.0, 3.7, 1e6, 2.0**53]
    for _ in range(50):
        n_users = rng.randint(1, 8)
        current: dict[int, dict[tuple[object, ...], list[float]]] = {u: {} for u in range(n_users)}
        stream = Totals()
        for _ in range(60):
            user = rng.randrange(n_users)
            x = rng.choice((-1, 1)) * rng.random() * rng.choice(scales)
            new = metric(rng.randint(1, 5), x) if rng.random() < 0.85 else {}
            stream.replace(current[user], new)
            current[user] = new
        scratch = Totals()
        for contrib in current.values():
            scratch.add(contrib)
        nonzero = {key: stats for key, stats in stream.items() if any(stats)}  # a user gone leaves zeros, rewritten
        assert nonzero == dict(scratch.items())
        kept = [c[KEY] for c in current.values() if c]
        if kept:  # each float total is the exact sum of the contributions, rounded once
            for i in (3, 4):
                assert scratch.get(KEY)[i] == float(sum(Fraction(stats[i]) for stats in kept))


def test_integer_totals_stay_integers() -> None:
    totals = Totals()
    totals.add({("d", 20_000, "app_open", "ios", "1.0"): [3, 1], ("e", 3, 3001, 20_000): [1]})
    assert all(type(v) is int for _, stats in totals.take_dirty() for v in stats)


def test_a_value_beyond_the_gateway_bound_counts_as_an_event_with_no_value() -> None:
    """Only a record that bypassed the gateway can carry one: the worker must not stop on it, nor sum infinity."""
    funnels = Funnels([])
    user = UserState()
    user.assignments[3] = Assignment(3, "exp_3", 3001, "A", 1, 0, "v")
    for value in (1e308, float("inf"), float("nan"), 2.0):
        ev = UserEvent("e", "revenue", "metric", 1_000, 1_000, "", "", 3, value, ((3, 3001, 1),))
        user.add_event(ev, funnels)
    (key, stats), *_ = contribution(user, funnels).items()
    assert key == ("m", 3, 3001, "revenue", 0)
    assert stats == [1, 4, 1, 2.0, 4.0]


# ---- cumulative experiment rollups (what results read) ------------------------------------------------

DAY = 86_400_000
T0 = 20_000 * DAY + 12 * 3_600_000  # noon of day 20000: the exposure


def _event(i: int, name: str, t: int, attributed: bool, kind: str = "event", value: float | None = None) -> UserEvent:
    return UserEvent(f"e{i}", name, kind, t, t, "ios", "1.0", 3 if kind == "metric" else None, value,
                     ((3, 3001, 1),) if attributed else ())  # fmt: skip


def _user(events: list[UserEvent], assigned_at: int = T0) -> UserState:
    user = UserState()
    user.assignments[3] = Assignment(3, "exp3", 3001, "A", 1, assigned_at, "v")
    for ev in events:
        user.add_event(ev, Funnels([]))
    return user


def test_cumulative_x_counts_from_exposure_and_y_over_the_lookback_days_before_it() -> None:
    from schemas.analysis import ExperimentRules

    events = [
        _event(1, "view", T0 - 3 * DAY, False),  # pre-exposure, inside 14 days: y
        _event(2, "view", T0 - 20 * DAY, False),  # older than the lookback: neither
        _event(3, "view", T0 - 2 * 3_600_000, False),  # the exposure day, before exposure: neither
        _event(4, "view", T0 + 1000, True),  # x
        _event(5, "view", T0 + 2000, True),  # x
        _event(6, "buy", T0 + 3000, True),
        _event(7, "revenue", T0 + 4000, True, "metric", 2.5),
        _event(8, "revenue", T0 + 5000, True, "metric", 4.0),
    ]
    out = contribution(_user(events), Funnels([]), {3: ExperimentRules(lookback_days=14)})
    assert out[("x", 3, 1, 3001)] == [1]
    assert out[("c", 3, 1, 3001, "event", "view")] == [1, 2, 2, 4, 1, 1, 1, 2, 1, 1]
    assert out[("c", 3, 1, 3001, "event", "buy")] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    assert out[("c", 3, 1, 3001, "tracked", "revenue")] == [1, 2, 6.5, 42.25, 0, 0.0, 0.0, 0.0, 0, 1]
    assert out[("xd", 3, 1, 3001, T0 // DAY)] == [1]
    # a lookback of 2 days no longer reaches the pre-exposure view 3 days back; 0 days: no covariate
    for days in (2, 0):
        out = contribution(_user(events), Funnels([]), {3: ExperimentRules(lookback_days=days)})
        assert out[("c", 3, 1, 3001, "event", "view")] == [1, 2, 2, 4, 0, 0, 0, 0, 0, 1]


def test_an_attributed_late_event_on_a_lookback_day_is_counted_once_in_x() -> None:
    """An event received after the assignment but dated (client clock) two days before: x, not also y."""
    from schemas.analysis import ExperimentRules

    events = [_event(1, "view", T0 - 2 * DAY, True), _event(2, "view", T0 - 3 * DAY, False)]
    out = contribution(_user(events), Funnels([]), {3: ExperimentRules(lookback_days=14)})
    assert out[("c", 3, 1, 3001, "event", "view")] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_an_exposure_event_starts_the_count_and_users_without_it_are_not_exposed() -> None:
    from schemas.analysis import ExperimentRules

    rules = {3: ExperimentRules(lookback_days=14, exposure_event="checkout_seen")}
    events = [
        _event(1, "buy", T0 + 1000, True),  # after assignment, before the exposure event: not counted
        _event(2, "checkout_seen", T0 + 5000, True),
        _event(3, "buy", T0 + 6000, True),
    ]
    out = contribution(_user(events), Funnels([]), rules)
    assert out[("x", 3, 1, 3001)] == [1]
    assert out[("c", 3, 1, 3001, "event", "buy")] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    unexposed = contribution(_user(events[:1]), Funnels([]), rules)
    assert not [k for k in unexposed if k[0] in ("x", "c", "r")]


def test_ratio_rows_keep_the_cross_product_of_numerator_and_denominator() -> None:
    from schemas.analysis import ExperimentRules, RatioPart, RatioRule

    ratio = RatioRule("rev_per_view", RatioPart("tracked", "revenue", "sum"), RatioPart("event", "view", "count"))
    events = [_event(1, "view", T0 + 1, True), _event(2, "view", T0 + 2, True),
              _event(3, "revenue", T0 + 3, True, "metric", 3.0)]  # fmt: skip
    out = contribution(_user(events), Funnels([]), {3: ExperimentRules(ratios=(ratio,))})
    assert out[("r", 3, 1, 3001, "rev_per_view")] == [3.0, 9.0, 2.0, 4.0, 6.0]


def test_removing_an_event_again_leaves_the_cumulative_contribution_as_before() -> None:
    """Re-enrichment uncounts and recounts an event: the state must return exactly to where it was."""
    from schemas.analysis import ExperimentRules

    rules = {3: ExperimentRules(lookback_days=14, exposure_event="seen")}
    base = [_event(1, "seen", T0 + 10, True), _event(2, "view", T0 + 20, True)]
    user = _user(base)
    before = contribution(user, Funnels([]), rules)
    extra = _event(3, "view", T0 + 30, True)
    user.add_event(extra, Funnels([]))
    assert contribution(user, Funnels([]), rules) != before
    user.add_event(extra, Funnels([]), -1)
    assert contribution(user, Funnels([]), rules) == before
    assert not user.attributed_times.get((3, 3001, 1, 0, "missing"))


def test_funnel_per_variant_counts_only_events_attributed_to_it() -> None:
    """All users: every event. Per variant: from the exposure on, like metrics (events before it do not count)."""
    from schemas.experiments import Funnel

    funnels = Funnels([Funnel(key="f", name="f", steps=["open", "start", "done"], conversion_window_seconds=3600)])
    events = [
        _event(1, "open", T0 - 60_000, False),  # before the assignment: all-users funnel only
        _event(2, "start", T0 + 1000, True),
        _event(3, "done", T0 + 2000, True),
    ]
    user = _user([])
    for ev in events:
        user.add_event(ev, funnels)
    out = contribution(user, funnels)
    assert {k[4] for k in out if k[:4] == ("f", "f", 0, 0)} == {1, 2, 3}
    assert not [k for k in out if k[:2] == ("f", "f") and k[2] == 3]
    # once the user opens again after exposure, the variant sees step 1 only: start/done came before it
    user.add_event(_event(4, "open", T0 + 3000, True), funnels)
    out = contribution(user, funnels)
    assert {k[4] for k in out if k[:4] == ("f", "f", 3, 3001)} == {1}
    # a late event (received now, dated earlier) that completes the path in order within the window
    user.add_event(_event(5, "start", T0 + 4000, True), funnels)
    user.add_event(_event(6, "done", T0 + 3000 + 3_600_000 + 1, True), funnels)  # past the window: not done
    out = contribution(user, funnels)
    assert {k[4] for k in out if k[:4] == ("f", "f", 3, 3001)} == {1, 2}
    user.add_event(_event(7, "done", T0 + 3500, True), funnels)  # out of order: before its start, not done
    assert {k[4] for k in contribution(user, funnels) if k[:4] == ("f", "f", 3, 3001)} == {1, 2}
    user.add_event(_event(8, "done", T0 + 5000, True), funnels)
    assert {k[4] for k in contribution(user, funnels) if k[:4] == ("f", "f", 3, 3001)} == {1, 2, 3}


def test_a_funnel_whose_steps_repeat_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from schemas.experiments import Funnel

    with pytest.raises(ValidationError, match="duplicate_step"):
        Funnel(key="f", name="f", steps=["open", "start", "open"], conversion_window_seconds=60)


def test_last_active_day_counts_each_user_once_on_their_latest_day() -> None:
    user = _user([_event(1, "open", T0 - 3 * DAY, False), _event(2, "open", T0, True)])
    out = contribution(user, Funnels([]))
    assert [(k, v) for k, v in out.items() if k[0] == "l"] == [(("l", T0 // DAY), [1])]


def test_a_re_enriched_event_moves_the_user_into_the_variants_funnel() -> None:
    """An assignment that reaches the worker after events received later than it re-enriches them (the pipeline
    uncounts each event and counts it again with the new attribution): the user enters the variant's funnel,
    while the all-users funnel, which does not depend on attribution, stays as it was."""
    from schemas.experiments import Funnel

    funnels = Funnels([Funnel(key="f", name="f", steps=["open", "start"], conversion_window_seconds=3600)])
    user = _user([])
    events = [_event(1, "open", T0 + 1000, False), _event(2, "start", T0 + 2000, False)]
    for ev in events:
        user.add_event(ev, funnels)
    before = contribution(user, funnels)
    assert not [k for k in before if k[:3] == ("f", "f", 3)]
    for ev in events:  # what Pipeline._on_assignment does for each event it re-enriches
        user.add_event(ev, funnels, -1)
        ev.attribution = ((3, 3001, 1),)
        user.add_event(ev, funnels, +1)
    after = contribution(user, funnels)
    assert {k[4] for k in after if k[:4] == ("f", "f", 3, 3001)} == {1, 2}
    assert {k: v for k, v in after.items() if k[:3] == ("f", "f", 0)} == {
        k: v for k, v in before.items() if k[:3] == ("f", "f", 0)
    }


def test_a_user_who_tracked_zero_has_the_source_but_no_non_zero_value() -> None:
    from schemas.analysis import ExperimentRules

    events = [_event(1, "revenue", T0 + 1, True, "metric", 0.0)]
    out = contribution(_user(events), Funnels([]), {3: ExperimentRules()})
    assert out[("c", 3, 1, 3001, "tracked", "revenue")] == [1, 1, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0, 0]


# ---- attribution by phase, in whatever order the records come (the pipeline's own code, in process)


class _NoFaustApp:
    """What Pipeline needs of a Faust app here: a table (dict) for its first assignments."""

    def Table(self, *args: object, **kwargs: object) -> dict[str, dict[str, object]]:  # noqa: N802 - Faust's name
        class _Table(dict):  # type: ignore[type-arg]
            def __missing__(self, key: str) -> dict[str, object]:
                return {}

        return _Table()


@pytest.mark.parametrize(
    ("order", "table_has_phase_2"),
    [("A1 E A2", False), ("E A1 A2", False), ("A2 E A1", False), ("E A1 A2", True), ("A1 E A2", True),
     ("E A2 A1", True)],
)  # fmt: skip
def test_an_event_between_two_phases_ends_attributed_to_phase_1_in_any_order(
    order: str, table_has_phase_2: bool
) -> None:
    """A1, A2: a user's phase-1 and phase-2 first assignments; E: an event received between them. Whatever the
    order of the records (two topics; a replay whose Faust table already holds A2), E's last written row is
    attributed to phase 1 and both assignments get their row (found by review: a phase-1 assignment read
    after the phase-2 one re-enriched nothing and wrote no row)."""
    import orjson

    from abstream.config import Settings
    from schemas.events import RECORD_VERSION
    from stream_workers.pipeline import PartitionState, Pipeline

    now = int(time.time() * 1000)
    t1, t2 = now - 10_000, now - 5_000

    def assignment(phase: int, at: int, variant: int) -> bytes:
        return orjson.dumps({"user_id": "u", "experiment_id": 7, "experiment_key": "e", "variant_id": variant,
                             "variant_key": f"v{variant}", "phase": phase, "assigned_at": at,
                             "assignment_version": "x"})  # fmt: skip

    received = t1 + 1000
    event = orjson.dumps({"v": RECORD_VERSION, "user_id": "u", "surface": "v1", "received_at_ms": received, "events": [{
        "event_id": "e1", "event_name": "open", "kind": "event", "corrected_at_ms": None, "occurred_at_ms": received,
        "skew_ms": None, "experiment_id": None, "value": None, "platform": None, "app_version": None,
        "session_id": None, "install_id": None, "occurred_at": None, "sent_at": None, "properties": {},
        "context": {}, "metric_name": None}]})  # fmt: skip
    records = {"A1": ("assignments", assignment(1, t1, 1)), "A2": ("assignments", assignment(2, t2, 2)),
               "E": ("events", event)}  # fmt: skip
    pipeline = Pipeline(Settings(), _NoFaustApp(), None)  # type: ignore[arg-type]
    n = pipeline.settings.kafka_partitions
    part = PartitionState(pipeline.partitioner(b"u", list(range(n)), list(range(n))))
    pipeline.partitions[part.partition] = part
    if table_has_phase_2:
        pipeline.table["u"] = {"7": Assignment(7, "e", 2, "v2", 2, t2, "x").as_json() | {"assignment_version": "x"}}
        pipeline._merge_table(part)
    offsets = {"events": 0, "assignments": 0}
    for name in order.split():
        topic, value = records[name]
        pipeline._apply(part, topic == "events", topic, offsets[topic], value)
        offsets[topic] += 1
    last = orjson.loads(part.event_rows[-1][22])
    assert [(a["variant_id"], a["phase"]) for a in last] == [(1, 1)], part.event_rows
    assert sorted((r[5], r[3]) for r in part.assignment_rows) == [(1, 1), (2, 2)]
