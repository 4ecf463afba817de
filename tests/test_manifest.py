"""The manifest (tests.json), its JSON Schema, and the API payload models of schemas/experiments.py."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import ValidationError

from abstream.config import REPO_ROOT, Settings
from schemas.ab_tests import ABAssignRequest, ABTestCreate, ABTestOut, key_from_name
from schemas.assignment import AssignmentRequest
from schemas.assignment_record import AssignmentRecord
from schemas.errors import validation_failed
from schemas.experiments import (
    SCHEMA_PATH,
    Experiment,
    Manifest,
    ManifestError,
    Status,
    load_manifest,
    main,
    manifest_schema_text,
)
from schemas.names import EVENT_NAME_PATTERN

TESTS_JSON = REPO_ROOT / "tests.json"


def _raw() -> dict[str, Any]:
    return json.loads(TESTS_JSON.read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: Any, name: str = "tests.json") -> Path:
    path = tmp_path / name
    path.write_bytes(orjson.dumps(data))
    return path


def _problems(tmp_path: Path, data: Any) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, data))
    return str(info.value)


# ------------------------------------------------------------------------------------------ tests.json


def test_tests_json_holds_the_seeded_experiments() -> None:
    manifest = load_manifest(TESTS_JSON)
    by_key = {e.key: e for e in manifest.experiments}
    exp3, exp4 = by_key["exp_3_landing_journey"], by_key["exp_4_achievements_density"]
    assert (exp3.id, exp4.id) == (3, 4)
    assert exp3.status is Status.RUNNING and exp4.status is Status.RUNNING
    assert [(v.key, v.name, v.weight) for v in exp3.variants] == [
        ("A", "workouts_preloaded", 0.34),
        ("B", "workouts_starter", 0.33),
        ("C", "creatures_recommended", 0.33),
    ]
    assert [(v.key, v.name, v.weight) for v in exp4.variants] == [
        ("A", "baseline", 0.5),
        ("B", "minimal_achievements", 0.5),
    ]
    assert [v.id for v in exp3.variants] == [3001, 3002, 3003]
    assert exp3.baseline_config and all(v.config_overrides for v in exp3.variants[1:])
    (funnel,) = manifest.funnels
    assert funnel.steps == ["app_open", "workout_started", "session_submitted"]
    assert funnel.conversion_window_seconds == 86400


def test_schema_file_is_in_sync() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == manifest_schema_text(), "run: python -m schemas.experiments"
    assert main(["--check"]) == 0


def test_schema_check_reports_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "manifest.schema.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == manifest_schema_text()


def test_schema_validates_tests_json_and_rejects_unknown_fields() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(_raw())
    bad = _raw()
    bad["experiments"][0]["variants"][0]["wieght"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    bad = _raw()
    bad["experiments"][0]["status"] = "ON"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


# ------------------------------------------------------------------------------------ error messages


def test_error_names_file_and_json_path(tmp_path: Path) -> None:
    data = _raw()
    data["experiments"][1]["variants"][0]["weight"] = 0
    message = _problems(tmp_path, data)
    assert "tests.json: experiments.1.variants.0.weight: Input should be greater than 0" in message
    assert message.startswith(str(tmp_path / "tests.json"))


def test_unknown_field_is_rejected_with_its_path(tmp_path: Path) -> None:
    data = _raw()
    data["experiments"][0]["variants"][2]["wieght"] = 0.5
    assert "experiments.0.variants.2.wieght: Extra inputs are not permitted" in _problems(tmp_path, data)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    data = _raw()
    data["experiments"][0]["coverage"] = 1.5
    data["experiments"][1]["status"] = "ON"
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, data))
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == ["experiments.0.coverage", "experiments.1.status"]


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "tests.json"
    path.write_text('{"version": 1,', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"tests\.json: invalid JSON"):
        load_manifest(path)
    with pytest.raises(ManifestError, match=r"nope\.json: cannot read"):
        load_manifest(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["experiments"][1].update(key="exp_3_landing_journey"),
            "experiments.1.key: duplicate experiment key",
        ),
        (lambda d: d["experiments"][1].update(id=3), "experiments.1.id: duplicate experiment id 3"),
        (lambda d: d["experiments"][1].update(name="Landing journey"), "experiments.1.name: duplicate experiment name"),
        (
            lambda d: d["experiments"][0]["variants"][2].update(key="A"),
            "experiments.0.variants.2.key: duplicate variant",
        ),
        (lambda d: d["experiments"][0]["variants"][2].update(name="workouts_starter"), "variants.2.name: duplicate"),
        (
            lambda d: d["experiments"][0]["variants"][1].update(id=3001),
            "experiments.0.variants.1.id: duplicate variant id",
        ),
        (lambda d: d["experiments"][1]["variants"][0].update(id=3001), "experiments.1.variants.0.id: variant id 3001"),
        (
            lambda d: d["experiments"][0].update(start_at="2026-03-01T00:00:00Z", end_at="2026-03-01T00:00:00Z"),
            "experiments.0.end_at: end_at must be later than start_at",
        ),
        (
            lambda d: d["experiments"][0].update(targeting={"min_app_version": "0.10.0", "max_app_version": "0.9.1"}),
            "experiments.0.targeting.max_app_version: max_app_version 0.9.1 is lower than min_app_version 0.10.0",
        ),
        (
            lambda d: d["experiments"][0].update(targeting={"min_app_version": "latest"}),
            "experiments.0.targeting.min_app_version: not a version",
        ),
        (lambda d: d["experiments"][0].update(targeting={"platform": ["web"]}), "experiments.0.targeting.platform.0"),
        (lambda d: d["experiments"][0].update(start_at="2026-02-01T00:00:00"), "experiments.0.start_at"),
        (lambda d: d["experiments"][0].update(key="exp:3"), "experiments.0.key: String should match pattern"),
        (lambda d: d["experiments"][0].update(hash_seed="a:b"), "experiments.0.hash_seed: String should match"),
        (lambda d: d["experiments"][0].update(id=0), "experiments.0.id: Input should be greater than or equal to 1"),
        (
            lambda d: d["experiments"][0].update(phase=2, phase_started_at=None),
            "experiments.0.phase_started_at: phase_started_at is required",
        ),
        (lambda d: d["experiments"][0]["variants"].pop() and d["experiments"][0]["variants"].pop(), "variants: List"),
        (
            lambda d: d["experiments"][0]["variants"][0].update(weight=0.00001),
            "experiments.0.variants.0.weight: weight gets 0 of 10000 buckets",
        ),
        (lambda d: d.update(version=2), "version: Input should be 1"),
        (lambda d: d["funnels"][0].update(steps=["app_open"]), "funnels.0.steps: List should have at least 2 items"),
        (lambda d: d["funnels"][0].update(steps=["app open", "x"]), "funnels.0.steps.0: String should match pattern"),
        (lambda d: d["funnels"][0].update(experiment_keys=["nope"]), "funnels.0.experiment_keys.0: no experiment"),
        (lambda d: d["funnels"].append(copy.deepcopy(d["funnels"][0])), "funnels.1.key: duplicate funnel key"),
        (lambda d: d["funnels"][0].update(conversion_window_seconds=0), "funnels.0.conversion_window_seconds"),
    ],
)
def test_invalid_manifest(tmp_path: Path, mutate: Any, expected: str) -> None:
    data = _raw()
    mutate(data)
    assert expected in _problems(tmp_path, data)


def test_variant_ids_and_seed_defaults() -> None:
    data = _raw()
    exp = data["experiments"][0]
    del exp["hash_seed"]
    for variant in exp["variants"]:
        del variant["id"]
    parsed = Manifest.model_validate(data).experiments[0]
    assert [v.id for v in parsed.variants] == [3001, 3002, 3003]
    assert parsed.hash_seed == parsed.seed == "exp_3_landing_journey"


def test_derived_id_colliding_with_an_explicit_one_is_rejected() -> None:
    data = _raw()["experiments"][0]
    data["variants"][0]["id"] = 3002
    del data["variants"][1]["id"]
    with pytest.raises(ValidationError) as info:
        Experiment.model_validate(data)
    assert info.value.errors()[0]["loc"] == ("variants", 1, "id")
    assert info.value.errors()[0]["type"] == "id_collision"


def test_derived_id_must_fit_uint32() -> None:
    data = {**_raw()["experiments"][0], "id": 4_294_968}
    for variant in data["variants"]:
        del variant["id"]
    with pytest.raises(ValidationError) as info:
        Experiment.model_validate(data)
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [
        (("variants", i, "id"), "id_too_large") for i in range(3)
    ]
    data["variants"] = _raw()["experiments"][0]["variants"]  # explicit ids: fine
    assert Experiment.model_validate(data).id == 4_294_968


def test_funnel_step_pattern_matches_event_names() -> None:
    events = pytest.importorskip("schemas.events")
    assert events.NAME_PATTERN == EVENT_NAME_PATTERN


# ------------------------------------------------------------------------------------------ ArkForge

SEED_CREATE = {
    "test_name": "homepage_button_color",
    "description": "Testing different button colors on homepage",
    "variants": [
        {"variant_name": "red", "description": "Red button", "weight": 0.5},
        {"variant_name": "blue", "description": "Blue button", "weight": 0.5},
    ],
}
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_ab_test_create_seed_example_becomes_a_running_experiment() -> None:
    body = ABTestCreate.model_validate(SEED_CREATE)
    exp = body.to_experiment(7, NOW)
    assert (exp.key, exp.id, exp.name, exp.status) == ("homepage_button_color", 7, "homepage_button_color", "RUNNING")
    assert [(v.key, v.id, v.name, v.weight) for v in exp.variants] == [
        ("A", 7001, "red", 0.5),
        ("B", 7002, "blue", 0.5),
    ]
    assert exp.created_at == NOW and exp.seed == "homepage_button_color"
    out = ABTestOut.from_experiment(exp).model_dump(mode="json")
    assert set(out) == {"id", "test_name", "description", "created_at", "status", "key", "phase", "variants",
                        "metrics", "exposure_event", "cuped_lookback_days", "sequential_testing"}  # fmt: skip
    assert set(out["variants"][0]) == {
        "id",
        "test_id",
        "variant_name",
        "description",
        "weight",
        "created_at",
        "key",
        "is_control",
    }
    assert out["variants"][1] | {"created_at": None} == {
        "id": 7002,
        "test_id": 7,
        "variant_name": "blue",
        "description": "Blue button",
        "weight": 0.5,
        "created_at": None,
        "key": "B",
        "is_control": False,
    }


def test_ab_test_out_normalises_weights() -> None:
    body = ABTestCreate.model_validate(
        {"test_name": "t", "variants": [{"variant_name": "a", "weight": 3}, {"variant_name": "b"}]}
    )
    out = ABTestOut.from_experiment(body.to_experiment(1, NOW))
    assert [v.weight for v in out.variants] == [0.75, 0.25]


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({**SEED_CREATE, "test_name": "   "}, "test_name", "string_too_short"),
        ({**SEED_CREATE, "test_name": "x" * 201}, "test_name", "string_too_long"),
        ({**SEED_CREATE, "variants": SEED_CREATE["variants"][:1]}, "variants", "too_short"),
        ({**SEED_CREATE, "variants": [SEED_CREATE["variants"][0]] * 2}, "variants.1.variant_name", "duplicate_name"),
        (
            {**SEED_CREATE, "variants": [{"variant_name": "a", "weight": 0}, {"variant_name": "b"}]},
            "variants.0.weight",
            "greater_than",
        ),
        ({"variants": SEED_CREATE["variants"]}, "test_name", "missing"),
    ],
)
def test_ab_test_create_rejects(body: dict[str, Any], field: str, code: str) -> None:
    with pytest.raises(ValidationError) as info:
        ABTestCreate.model_validate(body)
    error = validation_failed(info.value)
    assert error.status == 400 and error.code == "validation_failed"
    assert {"field": field, "code": code} in [{"field": d["field"], "code": d["code"]} for d in error.details]


def test_key_from_name() -> None:
    assert key_from_name("Homepage Button Color!", 5) == "homepage_button_color"
    assert key_from_name("Homepage Button Color!", 5, taken={"homepage_button_color"}) == "homepage_button_color_5"
    assert key_from_name("ボタン", 9) == "test_9"


def test_ab_assign_request() -> None:
    assert ABAssignRequest.model_validate({"user_id": "user123", "extra": 1}).user_id == "user123"
    for bad in ({}, {"user_id": ""}, {"user_id": "  "}, {"user_id": 123}):
        with pytest.raises(ValidationError):
            ABAssignRequest.model_validate(bad)


# --------------------------------------------------------------------------------------- Calicritters


def test_assignment_request_seed_example() -> None:
    req = AssignmentRequest.model_validate(
        {
            "anonymous_user_id": "550e8400-e29b-41d4-a716-446655440000",
            "platform": "ios",
            "app_version": "0.1.0",
            "session_id": "s_123",
            "install_id": "i_123",
            "locale": "en-US",
        }
    )
    assert (req.platform, req.app_version, req.session_id, req.install_id) == ("ios", "0.1.0", "s_123", "i_123")


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({}, "anonymous_user_id", "missing"),
        ({"anonymous_user_id": ""}, "anonymous_user_id", "string_too_short"),
        ({"anonymous_user_id": " "}, "anonymous_user_id", "blank_string"),
        ({"anonymous_user_id": 42}, "anonymous_user_id", "string_type"),
        ({"anonymous_user_id": "u", "platform": "web"}, "platform", "literal_error"),
        ({"anonymous_user_id": "u", "app_version": 1}, "app_version", "string_type"),
        ({"anonymous_user_id": "u" * 129}, "anonymous_user_id", "string_too_long"),
    ],
)
def test_assignment_request_rejects(body: dict[str, Any], field: str, code: str) -> None:
    with pytest.raises(ValidationError) as info:
        AssignmentRequest.model_validate(body)
    details = validation_failed(info.value).details
    assert [(d["field"], d["code"]) for d in details] == [(field, code)]


def test_id_limit_follows_settings() -> None:
    body = {"anonymous_user_id": "u" * 20}
    with pytest.raises(ValidationError) as info:
        AssignmentRequest.model_validate(body, context={"settings": Settings(max_id_length=10)})
    assert info.value.errors()[0]["ctx"] == {"max_length": 10}
    assert AssignmentRequest.model_validate({"anonymous_user_id": "u" * 200}, context={"max_id_length": 256})


def test_assignment_record_round_trip() -> None:
    record = AssignmentRecord(
        user_id="u1",
        experiment_key="exp_3_landing_journey",
        experiment_id=3,
        variant_key="B",
        variant_id=3002,
        phase=1,
        assignment_version="0123456789abcdef",
        assigned_at=1_771_496_130_123,
        platform="ios",
        app_version="0.1.0",
        surface="v1",
    )
    data = record.to_bytes()
    assert orjson.loads(data)["v"] == 1
    assert AssignmentRecord.from_bytes(data) == record
    assert AssignmentRecord.from_bytes(data.replace(b'"v":1', b'"v":1,"future":true')) == record
    with pytest.raises(ValidationError):
        AssignmentRecord.from_bytes(data.replace(b'"v":1', b'"v":2'))
