"""The rollup arithmetic of the workers (stream_workers.rollups), without a stack.

The stream maintains totals by replacing users' contributions one change at a time; ``abstream verify``
sums the final contributions from scratch. These must agree exactly, whatever the history.
"""

from __future__ import annotations

import random
from fractions import Fraction

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
        ev = UserEvent("e", "revenue", "metric", 1_000, 1_000, "", "", 3, value, ((3, 3001),))
        user.add_event(ev, funnels)
    (key, stats), *_ = contribution(user, funnels).items()
    assert key == ("m", 3, 3001, "revenue", 0)
    assert stats == [1, 4, 1, 2.0, 4.0]
