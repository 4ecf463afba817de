"""Bucketing, eligibility, config merge, registry version and edit rules of gateway/assignment.py (pure)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import chisquare

from abstream.config import REPO_ROOT
from gateway import assignment as ga
from gateway.assignment import (
    Bucketer,
    assign,
    assign_one,
    assignment_version,
    bucket_bounds,
    bucket_counts,
    bucketer_for,
    buckets,
    check_edit,
    compare_versions,
    coverage_threshold,
    decide,
    deep_merge,
    merged_config,
)
from schemas.assignment import AssignmentRequest
from schemas.assignment_record import AssignmentRecord
from schemas.errors import ApiError
from schemas.experiments import Experiment, Status, Targeting, load_manifest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
VECTORS = json.loads((REPO_ROOT / "schemas" / "hash_vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def seeded() -> list[Experiment]:
    return load_manifest(REPO_ROOT / "tests.json").experiments


def _exp(**changes: Any) -> Experiment:
    """A small RUNNING experiment, with ``changes`` applied to its JSON form."""
    data: dict[str, Any] = {
        "key": "exp_x",
        "id": 10,
        "name": "X",
        "status": "RUNNING",
        "hash_seed": "exp_x.p1",
        "baseline_config": {"x": {"color": "grey", "size": 1}},
        "variants": [
            {"key": "A", "name": "control", "weight": 1, "config_overrides": {}},
            {"key": "B", "name": "treatment", "weight": 1, "config_overrides": {"x": {"color": "red"}}},
        ],
    }
    data.update(changes)
    return Experiment.model_validate(data)


def _user_ids(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


# ------------------------------------------------------------------------------------------- vectors


def _independent(seed: str, key: str, user_id: str, coverage: float, weights: list[float]) -> int | None:
    """A second implementation written from docs/assignment.md, with floats where they are exact enough."""
    digest = hashlib.sha256(f"{seed}:{key}:{user_id}".encode()).digest()
    if int(digest[8:16].hex(), 16) % 10000 >= int(coverage * 10000 + 0.5 + 1e-9):
        return None
    bucket = int(digest[:8].hex(), 16) % 10000
    edge = 0
    for index, count in enumerate(bucket_counts(weights)):
        edge += count
        if bucket < edge:
            return index
    raise AssertionError


def test_vectors_reproduce() -> None:
    rows = VECTORS["vectors"]
    assert len(rows) >= 200
    assert VECTORS["buckets"] == 10000
    for row in rows:
        seed, key, user_id = row["hash_seed"], row["experiment_key"], row["user_id"]
        assert buckets(seed, key, user_id) == (row["bucket"], row["coverage_bucket"]), row
        assert hashlib.sha256(f"{seed}:{key}:{user_id}".encode()).digest()[:16].hex() == row["digest_prefix_hex"]
        assert coverage_threshold(row["coverage"]) == row["coverage_threshold"]
        assert bucket_bounds(row["weights"]) == row["bucket_bounds"]
        assert row["in_coverage"] == (row["coverage_bucket"] < row["coverage_threshold"])
        bucketer = Bucketer(seed, key, row["coverage"], row["weights"])
        assert bucketer.variant_index(user_id) == row["variant_index"], row
        assert _independent(seed, key, user_id, row["coverage"], row["weights"]) == row["variant_index"], row
        expected_key = row["variant_keys"][row["variant_index"]] if row["variant_index"] is not None else None
        assert row["variant_key"] == expected_key


def test_vectors_cover_seeded_experiments_and_edge_cases(seeded: list[Experiment]) -> None:
    rows = VECTORS["vectors"]
    for exp in seeded:
        mine = [r for r in rows if r["experiment_key"] == exp.key and r["hash_seed"] == exp.seed]
        assert mine and all(r["weights"] == [v.weight for v in exp.variants] for r in mine)
    assert {r["coverage"] for r in rows} >= {0.0, 1.0, 0.5, 0.2345}
    assert any(not r["in_coverage"] for r in rows) and any(r["in_coverage"] for r in rows)
    assert any(not r["user_id"].isascii() for r in rows)
    assert {len(set(r["variant_keys"])) for r in rows} >= {2, 3, 4}


def test_vectors_file_is_in_sync() -> None:
    path = REPO_ROOT / "schemas" / "hash_vectors.json"
    assert path.read_text(encoding="utf-8") == ga.vectors_text(), "run: python -m gateway.assignment --vectors"
    assert ga.main(["--check"]) == 0


def test_docs_reference_snippet_reproduces_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (REPO_ROOT / "docs" / "assignment.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    assert len(snippets) == 1
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(snippets[0], "docs/assignment.md", "exec"), {})  # asserts every vector


def test_vectors_main_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    assert ga.main(["--check", "--out", str(out)]) == 1
    assert ga.main(["--vectors", "--out", str(out)]) == 0
    assert ga.main(["--check", "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == VECTORS


# ------------------------------------------------------------------------------------ buckets, weights


@pytest.mark.parametrize(
    ("weights", "counts"),
    [
        ([0.34, 0.33, 0.33], [3400, 3300, 3300]),
        ([0.5, 0.5], [5000, 5000]),
        ([1, 1, 1], [3334, 3333, 3333]),
        ([1, 1, 1, 1, 1, 1, 1], [1429, 1429, 1429, 1429, 1428, 1428, 1428]),
        ([1, 2, 3, 4], [1000, 2000, 3000, 4000]),
        ([0.001, 0.999], [10, 9990]),
        ([2, 1], [6667, 3333]),
    ],
)
def test_bucket_counts(weights: list[float], counts: list[int]) -> None:
    assert bucket_counts(weights) == counts
    assert sum(counts) == 10000
    assert bucket_counts([w * 10 for w in weights]) == counts  # only proportions matter


def test_bucket_counts_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        bucket_counts([1, 0])


@pytest.mark.parametrize(
    ("coverage", "threshold"),
    [(0, 0), (1, 10000), (0.29, 2900), (0.2345, 2345), (0.00005, 1), (0.00004, 0), (0.5, 5000), (0.99995, 10000)],
)
def test_coverage_threshold(coverage: float, threshold: int) -> None:
    assert coverage_threshold(coverage) == threshold


def test_bucketer_matches_reference_and_batch() -> None:
    users = _user_ids(2000) + ["ユーザー", "", "a:b"]
    bucketer = Bucketer("seed", "exp", 0.7, [3, 2, 5])
    singles = [bucketer.variant_index(u) for u in users]
    assert bucketer.variant_indexes(users) == singles
    assert all(bucketer.buckets(u) == buckets("seed", "exp", u) for u in users)
    assert None in singles and {0, 1, 2} <= set(singles)


@pytest.mark.parametrize("key", ["exp_3_landing_journey", "exp_4_achievements_density"])
def test_seeded_split_matches_weights(seeded: list[Experiment], key: str) -> None:
    exp = next(e for e in seeded if e.key == key)
    users = _user_ids(100_000)
    indexes = bucketer_for(exp).variant_indexes(users)
    observed = [indexes.count(i) for i in range(len(exp.variants))]
    total = sum(v.weight for v in exp.variants)
    expected = [len(users) * v.weight / total for v in exp.variants]
    assert sum(observed) == len(users)  # coverage 1: everyone is in
    assert chisquare(observed, expected).pvalue > 0.001, (observed, expected)
    assert Bucketer(exp.seed, exp.key, exp.coverage, [v.weight for v in exp.variants]).variant_indexes(users) == indexes


def test_experiments_split_independently(seeded: list[Experiment]) -> None:
    """Being in exp 3's variant C says nothing about exp 4's variant (different keys and seeds)."""
    exp3, exp4 = seeded
    users = _user_ids(60_000, "ind")
    pairs = list(zip(bucketer_for(exp3).variant_indexes(users), bucketer_for(exp4).variant_indexes(users), strict=True))
    table = [[sum(1 for p in pairs if p == (a, b)) for b in range(2)] for a in range(3)]
    rows = [sum(r) for r in table]
    cols = [sum(table[a][b] for a in range(3)) for b in range(2)]
    observed = [table[a][b] for a in range(3) for b in range(2)]
    expected = [rows[a] * cols[b] / len(users) for a in range(3) for b in range(2)]
    assert chisquare(observed, expected, ddof=3).pvalue > 0.001


def test_raising_coverage_moves_nobody() -> None:
    users = _user_ids(50_000, "cov")
    weights = [0.34, 0.33, 0.33]
    before = Bucketer("s", "k", 0.1, weights).variant_indexes(users)
    middle = Bucketer("s", "k", 0.35, weights).variant_indexes(users)
    after = Bucketer("s", "k", 1.0, weights).variant_indexes(users)
    for low, high in ((before, middle), (middle, after)):
        assert all(h == lo for lo, h in zip(low, high, strict=True) if lo is not None)
    share = sum(i is not None for i in middle) / len(users)
    assert abs(share - 0.35) < 0.01
    inside = [i for i in middle if i is not None]
    observed = [inside.count(i) for i in range(3)]
    assert chisquare(observed, [len(inside) * w for w in weights]).pvalue > 0.001  # coverage does not bias


# ------------------------------------------------------------------------------------------ versions


@pytest.mark.parametrize(
    ("a", "b", "result"),
    [
        ("0.10.0", "0.9.1", 1),
        ("0.9.1", "0.10.0", -1),
        ("1.0", "1.0.0", 0),
        ("v1.2", "1.2.0", 0),
        ("1.2.3-beta", "1.2.3", -1),
        ("1.2.3-beta", "1.2.2", 1),
        ("1.2.3-rc.1", "1.2.3-beta", 1),
        ("1.2.3 (45)", "1.2.3", -1),
        ("1.2.3 (45)", "1.2.2", 1),
        ("2024.01.05-hotfix", "2024.1.5", -1),
        ("2024.01.05-hotfix.2", "2024.01.05-hotfix.10", -1),
        ("10.0.0-x", "9.9.9", 1),
    ],
)
def test_compare_versions(a: str, b: str, result: int) -> None:
    assert compare_versions(a, b) == result
    assert compare_versions(b, a) == -result


def test_compare_versions_rejects_non_versions() -> None:
    with pytest.raises(ValueError):
        compare_versions("latest", "1.0")


# ------------------------------------------------------------------------------- window and targeting


def test_window_bounds() -> None:
    start, end = NOW, NOW + timedelta(days=1)
    exp = _exp(start_at=start.isoformat(), end_at=end.isoformat())
    assert decide(exp, "u", start - timedelta(microseconds=1)).reason == "not_started"
    assert decide(exp, "u", start).variant is not None  # start inclusive
    assert decide(exp, "u", end - timedelta(microseconds=1)).variant is not None
    assert decide(exp, "u", end).reason == "ended"  # end exclusive
    # zones are honoured: 13:00+01:00 is 12:00Z
    assert decide(exp, "u", datetime.fromisoformat("2026-03-01T12:59:59+01:00")).reason == "not_started"
    for status in ("DRAFT", "PAUSED", "COMPLETED"):
        assert decide(_exp(status=status), "u", NOW).reason == "not_running"
    with pytest.raises(ValueError):
        decide(exp, "u", datetime(2026, 3, 1, 12))  # naive


@pytest.mark.parametrize(
    ("targeting", "platform", "app_version", "reason"),
    [
        ({}, None, None, None),
        ({"platform": ["ios"]}, "ios", None, None),
        ({"platform": ["ios"]}, "android", None, "platform_not_targeted"),
        ({"platform": ["ios", "android"]}, None, None, "platform_not_targeted"),
        ({"min_app_version": "0.9.1"}, None, "0.10.0", None),
        ({"min_app_version": "0.10.0"}, None, "0.9.1", "app_version_not_targeted"),
        ({"min_app_version": "0.10.0"}, None, "0.10.0", None),  # inclusive
        ({"max_app_version": "1.2.3"}, None, "1.2.3", None),  # inclusive
        ({"max_app_version": "1.2.3"}, None, "1.2.4", "app_version_not_targeted"),
        ({"max_app_version": "1.2.3"}, None, "1.2.3-beta", None),
        ({"min_app_version": "1.0.0"}, None, None, "app_version_not_targeted"),
        ({"min_app_version": "1.0.0"}, None, "garbage", "app_version_not_targeted"),
        ({"min_app_version": "1.0.0", "max_app_version": "2.0.0"}, None, "1.5 (300)", None),
        ({"platform": ["android"], "min_app_version": "1.0"}, "android", "0.9", "app_version_not_targeted"),
    ],
)
def test_targeting(
    targeting: dict[str, Any], platform: str | None, app_version: str | None, reason: str | None
) -> None:
    assert ga.targeting_reason(Targeting.model_validate(targeting), platform, app_version) == reason
    exp = _exp(targeting=targeting)
    decision = decide(exp, "u", NOW, platform=platform, app_version=app_version)
    assert decision.reason == reason and (decision.variant is None) == (reason is not None)


def test_assign_one_and_coverage_reason() -> None:
    exp = _exp(coverage=0.5)
    users = _user_ids(400, "one")
    results = [assign_one(exp, u, NOW) for u in users]
    reasons = {decide(exp, u, NOW).reason for u in users}
    assert reasons == {None, "not_in_coverage"}
    assert {v.key for v in results if v is not None} == {"A", "B"}
    assert [assign_one(exp, u, NOW) for u in users] == results  # deterministic
    assert assign_one(_exp(status="PAUSED"), users[0], NOW) is None


# ------------------------------------------------------------------------------------------ config


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}
    override = {"a": {"c": [3], "d": {"x": 2}}, "f": {"now": "object"}, "g": 5, "n": None, "a2": {"k": None}}
    merged = deep_merge(base, override)
    assert merged == {
        "a": {"b": 1, "c": [3], "d": {"e": 1, "x": 2}},
        "f": {"now": "object"},
        "g": 5,
        "n": None,
        "a2": {"k": None},
    }
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}  # untouched
    merged["a"]["c"].append(4)
    assert override["a"]["c"] == [3]  # no aliasing into the inputs


def test_merged_config_order_and_statuses() -> None:
    low = _exp(key="low", id=1, name="low", baseline_config={"shared": "low", "l": 1})
    high = _exp(key="high", id=2, name="high", baseline_config={"shared": "high", "x": {"color": "blue"}})
    paused = _exp(key="paused", id=3, name="paused", status="PAUSED", baseline_config={"p": True})
    draft = _exp(key="draft", id=4, name="draft", status="DRAFT", baseline_config={"d": True})
    done = _exp(key="done", id=5, name="done", status="COMPLETED", baseline_config={"c": True})
    experiments = [done, high, draft, paused, low]
    config = merged_config(experiments, {})
    assert config == {"shared": "high", "l": 1, "x": {"color": "blue"}, "p": True}
    # low's variant B overrides x.color even though high (larger id) has x.color in its baseline
    config = merged_config(experiments, {"low": low.variants[1]})
    assert config["x"]["color"] == "red"
    assert config["shared"] == "high"


def test_assign_seeded(seeded: list[Experiment]) -> None:
    request = AssignmentRequest(anonymous_user_id="550e8400-e29b-41d4-a716-446655440000", platform="ios")
    result = assign(list(reversed(seeded)), request, NOW)
    response = result.response().model_dump(mode="json")
    assert [a["experiment_id"] for a in response["assignments"]] == [3, 4]
    assert set(response) == {"anonymous_user_id", "assignments", "config", "assignment_version", "generated_at"}
    assert response["generated_at"] == "2026-03-01T12:00:00Z"
    assert response["assignment_version"] == assignment_version(seeded)
    for entry, exp in zip(response["assignments"], seeded, strict=True):
        variant = exp.variant_by_key(entry["variant_key"])
        assert variant is not None and entry["variant_id"] == variant.id and entry["variant_name"] == variant.name
        assert entry["phase"] == 1
    chosen = {a.experiment.key: a.variant for a in result.assignments}
    assert response["config"] == merged_config(seeded, chosen)
    assert set(response["config"]) == {"landing", "achievements"}
    again = assign(seeded, request, NOW + timedelta(hours=5), version="v")
    assert [a.variant.key for a in again.assignments] == [a.variant.key for a in result.assignments]
    assert again.assignment_version == "v"


def test_assign_skips_ineligible_but_keeps_baselines(seeded: list[Experiment]) -> None:
    android_only = _exp(targeting={"platform": ["android"]}, baseline_config={"android_thing": 1})
    result = assign([*seeded, android_only], AssignmentRequest(anonymous_user_id="u1", platform="ios"), NOW)
    assert [a.experiment.key for a in result.assignments] == ["exp_3_landing_journey", "exp_4_achievements_density"]
    assert result.config["android_thing"] == 1
    assert assign([], AssignmentRequest(anonymous_user_id="u1"), NOW).response().assignments == []


def test_assignment_records(seeded: list[Experiment]) -> None:
    request = AssignmentRequest(anonymous_user_id="u-rec", platform="android", app_version="1.4.0")
    now = datetime(2026, 2, 19, 10, 15, 30, 123456, tzinfo=UTC)
    records = assign(seeded, request, now, version="abc").records()
    assert [r.experiment_id for r in records] == [3, 4]
    record = records[0]
    assert record.assigned_at == 1_771_496_130_123
    assert (record.user_id, record.platform, record.app_version, record.surface) == ("u-rec", "android", "1.4.0", "v1")
    assert AssignmentRecord.from_bytes(record.to_bytes()) == record
    exp = seeded[0]
    decision = decide(exp, "u-rec", now)
    assert decision.variant is not None
    apiv1 = ga.record_for(exp, decision.variant, "u-rec", version="abc", now=now, surface="apiv1")
    assert (apiv1.variant_id, apiv1.surface, apiv1.platform) == (record.variant_id, "apiv1", None)


def test_ab_assign_response(seeded: list[Experiment]) -> None:
    exp = seeded[0]
    yes = ga.ab_assign_response(exp, "u", decide(exp, "u", NOW), "ver").model_dump()
    assert yes["assigned"] and yes["variant_id"] in {3001, 3002, 3003} and yes["reason"] is None
    no = ga.ab_assign_response(exp, "u", decide(exp, "u", NOW - timedelta(days=365)), "ver").model_dump()
    assert not no["assigned"] and no["variant_id"] is None and no["reason"] == "not_started"


# ------------------------------------------------------------------------------- assignment_version


def test_assignment_version(seeded: list[Experiment]) -> None:
    version = assignment_version(seeded)
    assert re.fullmatch(r"[0-9a-f]{16}", version)
    assert assignment_version(list(reversed(seeded))) == version  # order-independent
    assert assignment_version(load_manifest(REPO_ROOT / "tests.json").experiments) == version  # replicas agree
    exp3, exp4 = seeded
    changed = [
        [exp3],
        [exp3, exp4.model_copy(update={"status": Status.PAUSED})],
        [exp3, exp4.model_copy(update={"description": "new"})],
        [exp3, exp4.model_copy(update={"coverage": 0.9})],
        [
            exp3,
            _exp(
                **{
                    **exp4.model_dump(mode="json"),
                    "variants": [
                        {**v.model_dump(mode="json"), "weight": w}
                        for v, w in zip(exp4.variants, [0.6, 0.4], strict=True)
                    ],
                }
            ),
        ],
    ]
    versions = {assignment_version(c) for c in changed}
    assert version not in versions and len(versions) == len(changed)


# ---------------------------------------------------------------------------------------- check_edit


def _edit(old: Experiment, **changes: Any) -> Experiment:
    return Experiment.model_validate({**old.model_dump(mode="json"), **changes})


def _codes(old: Experiment, new: Experiment, **kwargs: Any) -> list[str]:
    with pytest.raises(ApiError) as info:
        check_edit(old, new, **kwargs)
    assert info.value.status == 409 and info.value.code == "edit_would_move_users"
    return [d["code"] for d in info.value.details]


def _variants(old: Experiment, *weights: float) -> list[dict[str, Any]]:
    return [{**v.model_dump(mode="json"), "weight": w} for v, w in zip(old.variants, weights, strict=True)]


def test_check_edit_allows_harmless_edits() -> None:
    old = _exp(coverage=0.5, targeting={"platform": ["ios"], "min_app_version": "1.0"})
    allowed = [
        _edit(old, coverage=0.8),
        _edit(old, name="renamed", description="why"),
        _edit(old, status="PAUSED"),
        _edit(old, status="COMPLETED"),
        _edit(old, end_at="2027-01-01T00:00:00Z"),
        _edit(old, baseline_config={"new": 1}),
        _edit(old, variants=[{**v.model_dump(mode="json"), "config_overrides": {"z": 1}} for v in old.variants]),
        _edit(old, variants=_variants(old, 5, 5)),  # same ranges
        _edit(old, targeting={"platform": ["ios", "android"]}),  # widened
        _edit(old, targeting={"platform": ["ios"], "min_app_version": "0.9"}),
    ]
    for new in allowed:
        check_edit(old, new)
    draft = _exp(status="DRAFT")
    check_edit(draft, _edit(draft, hash_seed="other", variants=_variants(draft, 1, 3)))
    done = _exp(status="COMPLETED")
    check_edit(done, _edit(done, variants=_variants(done, 1, 3)))


@pytest.mark.parametrize("status", ["RUNNING", "PAUSED"])
def test_check_edit_refuses_moves(status: str) -> None:
    old = _exp(status=status, coverage=0.5, start_at="2026-01-01T00:00:00Z")
    swapped = list(reversed(old.model_dump(mode="json")["variants"]))
    extra = {"key": "C", "name": "third", "weight": 1}
    cases = {
        "hash_seed_changed": _edit(old, hash_seed="exp_x.p2"),
        "weight_changed": _edit(old, variants=_variants(old, 0.6, 0.4)),
        "variants_changed": _edit(old, variants=swapped),
        "coverage_lowered": _edit(old, coverage=0.4),
        "targeting_narrowed": _edit(old, targeting={"platform": ["ios"]}),
        "start_at_later": _edit(old, start_at="2026-06-01T00:00:00Z"),
    }
    for code, new in cases.items():
        assert _codes(old, new) == [code] * (2 if code == "weight_changed" else 1)
    added = _edit(old, variants=[*old.model_dump(mode="json")["variants"], extra])
    assert _codes(old, added) == ["variants_changed"]
    three = _edit(old, variants=[*old.model_dump(mode="json")["variants"], extra])
    assert _codes(three, old) == ["variants_changed"]  # removed
    # a later start_at that is already past moves nobody
    check_edit(old, cases["start_at_later"], now=datetime(2026, 7, 1, tzinfo=UTC))


def test_check_edit_new_phase() -> None:
    old = _exp(coverage=0.5, phase_started_at="2026-01-01T00:00:00Z")
    phase2 = {"phase": 2, "hash_seed": "exp_x.p2", "phase_started_at": "2026-03-01T00:00:00Z"}
    check_edit(old, _edit(old, variants=_variants(old, 0.9, 0.1), coverage=0.1, **phase2))
    # a higher phase with the same seed is not a reshuffle: the usual rules apply
    assert _codes(old, _edit(old, coverage=0.1, **{**phase2, "hash_seed": old.hash_seed})) == ["coverage_lowered"]
    with pytest.raises(ApiError) as info:
        check_edit(old, _edit(old, **{**phase2, "phase_started_at": "2025-12-01T00:00:00Z"}))
    assert (info.value.status, info.value.code) == (400, "validation_failed")
    assert info.value.details[0]["field"] == "phase_started_at"
    # never: change the key, reuse a variant id for another key, lower the phase
    assert "key_changed" in _codes(old, _edit(old, key="exp_y", **phase2))
    reused = [{**v.model_dump(mode="json"), "key": k} for v, k in zip(old.variants, ["B", "A"], strict=True)]
    assert "variant_id_reused" in _codes(old, _edit(old, variants=reused, **phase2))
    later = _edit(old, **phase2)
    assert "phase_lowered" in _codes(later, old)


def test_check_edit_refuses_return_to_draft() -> None:
    old = _exp()
    with pytest.raises(ApiError) as info:
        check_edit(old, _edit(old, status="DRAFT"))
    assert (info.value.status, info.value.code) == (409, "invalid_status_transition")
    body = info.value.body()
    assert body["error"]["details"][0]["field"] == "status"
