"""`abstream loadgen` end to end: the CI scenario through both public surfaces, then the pipeline against the
simulator's exact truth (event_logs, assignments, rollups, funnels, results) and each interval against the
scenario's true effect."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from abstream.config import Settings
from abstream.loadgen.scenario import Scenario, ScenarioError, load
from abstream.loadgen.truth import METRICS, expected_mean, reached, true_effect
from tests.stack import UNDER_LOAD


@UNDER_LOAD
def test_the_ci_scenario_reaches_the_pipeline_exactly_and_its_intervals_cover_the_true_effects(
    stack: tuple[Settings, str],
) -> None:
    settings, base = stack
    env = {**os.environ, **settings.as_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "abstream.cli", "loadgen", "--scenario", "ci", "--url", base, "--run-id", "citest",
         "--check", "--json"],
        capture_output=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    try:
        out = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        pytest.fail(f"loadgen exited {proc.returncode} without a report: {proc.stderr.decode()[-3000:]}")
    failed = [row for row in out["check"] if not row["ok"]]
    assert proc.returncode == 0 and out["counts_equal"] and not failed, (failed, proc.stderr.decode()[-2000:])
    whats = " ".join(row["what"] for row in out["check"])
    for part in ("event_logs FINAL", "assignments per variant", "daily_metric_rollups", "funnel", "results means"):
        assert part in whats, f"the check must cover {part}"
    # every traffic shape the issue names happened
    assert out["users"] == 800 and out["events_acknowledged"] > 20_000
    assert out["gzip_requests"] > 0 and out["resent_after_success"] > 0 and out["duplicates_flagged"] > 0
    assert out["refused_expected"] > 0 and out["gave_up_events"] == 0
    assert set(out["experiments"]) == {"streaks", "aa"}
    # the intervals: 5 metrics x 1 treatment in each experiment; the seed and run id fix every draw
    coverage = out["coverage"]
    assert len(coverage) == 2 * len(METRICS) and all(c["covered"] is not None for c in coverage)
    assert sum(c["covered"] for c in coverage) >= len(coverage) - 1, coverage
    streaks_opens = next(c for c in coverage if c["experiment"] == "streaks" and c["metric"] == "opens")
    assert streaks_opens["significant"], "a +25% session effect on 800 users must be found"
    assert not any(c["significant"] for c in coverage if c["experiment"] == "aa"), "A/A: nothing to find"


def test_true_effects_are_the_closed_forms_of_the_model() -> None:
    scenario = load("ci")
    streaks, aa = scenario.experiments
    treated = streaks.variants[1]
    b = scenario.behaviour
    keep = 1 - b.broken_clock_share
    opens = {m.key: m for m in METRICS}
    assert expected_mean(scenario, streaks, streaks.control, opens["opens"]) == pytest.approx(
        keep * b.sessions_per_day * b.test_sessions
    )
    assert true_effect(scenario, streaks, treated, opens["bought"]) == pytest.approx(keep * b.purchase_share * 0.3)
    # revenue = conversion x value: (1.3)(1.1) - 1 relative
    rel = true_effect(scenario, streaks, treated, opens["revenue"]) / expected_mean(
        scenario, streaks, streaks.control, opens["revenue"]
    )
    assert rel == pytest.approx(1.3 * 1.1 - 1)
    # an A/A variant's effect is 0 on every metric, whatever the other experiment does to the users
    assert all(true_effect(scenario, aa, aa.variants[1], m) == pytest.approx(0) for m in METRICS)


def test_funnel_truth_takes_the_deepest_ordered_path_within_the_window() -> None:
    hour = 3_600_000
    assert reached([[0], [10], [20]], hour) == 3
    assert reached([[0], [20], [10]], hour) == 2  # the last step before the second: not in order
    assert reached([[0, 5 * hour], [5 * hour + 1], [2 * hour]], hour) == 2  # a later start does better
    assert reached([[0], [2 * hour], [3 * hour]], hour) == 1  # outside the window
    assert reached([[], [1], [2]], hour) == 0


def test_scenario_files_are_checked_and_named_in_errors(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    with pytest.raises(ScenarioError, match="no such scenario"):
        load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[experiments]]\nname = "e"\nvariants = [{ name = "a" }]\n')
    with pytest.raises(ScenarioError, match=r"bad.toml: experiments.0.variants"):
        load(str(bad))
    for name in ("ci", "default", "aa"):
        assert isinstance(load(name), Scenario)
    proc = subprocess.run([sys.executable, "-m", "abstream.cli", "loadgen", "--scenario", "nope"],
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1, proc.stderr
