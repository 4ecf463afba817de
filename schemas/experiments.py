"""The experiment manifest (tests.json): what an experiment is (``Experiment``, its ``Variant``s and
``Targeting``), the funnels, ``load_manifest``, and the manifest's JSON Schema. The registry, the gateway
and the workers all hold experiments in this shape, whichever surface created them.

The manifest rejects anything it does not know (``extra="forbid"``) because a typo in tests.json
(``"wieght"``) would otherwise silently change who sees what.

Elsewhere, by job: the API payloads in ``schemas.ab_tests`` (ArkForge ``/apiv1/ab-tests``) and
``schemas.assignment`` (Calicritters ``/v1/assignment``), the Kafka record in ``schemas.assignment_record``,
bucket arithmetic in ``schemas.buckets``, version comparison in ``schemas.versions``, shared field types
in ``schemas.fields``.

``python -m schemas.experiments`` regenerates ``schemas/manifest.schema.json`` (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import sys
from enum import StrEnum
from pathlib import Path
from typing import Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from schemas.analysis import (
    DEFAULT_CUPED_LOOKBACK_DAYS,
    MAX_CUPED_LOOKBACK_DAYS,
    MAX_METRICS,
    ExperimentRules,
    MetricDefinition,
    check_metrics,
    rules_of,
)
from schemas.buckets import BUCKETS, bucket_counts
from schemas.errors import field_path
from schemas.fields import JsonObject, OptionalText, Platform, field_error, raise_field_errors
from schemas.names import SEED_PATTERN, EventName, Key
from schemas.versions import compare_versions, is_valid_version

EXPERIMENT_ID_MAX = 2**32 - 1
VARIANT_ID_MAX = 2**32 - 1
"""Both ids are UInt32 in ClickHouse (clickhouse/0001_registry.sql, 0002_assignments.sql)."""
MAX_VARIANTS = 100


class Status(StrEnum):
    """Lifecycle of an experiment. Only RUNNING assigns; PAUSED keeps serving its baseline config."""

    DRAFT = "DRAFT"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Targeting(_Strict):
    """Who may enter. Absent fields do not restrict; a user lacking a field that is restricted is not eligible."""

    platform: list[Platform] | None = Field(
        default=None, min_length=1, description="Platforms that may enter; absent means all."
    )
    min_app_version: str | None = Field(
        default=None, min_length=1, max_length=64, description="Lowest app_version that may enter (inclusive)."
    )
    max_app_version: str | None = Field(
        default=None, min_length=1, max_length=64, description="Highest app_version that may enter (inclusive)."
    )

    @model_validator(mode="after")
    def _versions(self) -> Targeting:
        errors = [
            field_error((name,), "invalid_version", f"not a version: {value!r}", value)
            for name, value in (("min_app_version", self.min_app_version), ("max_app_version", self.max_app_version))
            if value is not None and not is_valid_version(value)
        ]
        raise_field_errors("Targeting", errors)
        if (
            self.min_app_version is not None
            and self.max_app_version is not None
            and compare_versions(self.min_app_version, self.max_app_version) > 0
        ):
            raise_field_errors(
                "Targeting",
                [
                    field_error(
                        ("max_app_version",),
                        "version_range_empty",
                        f"max_app_version {self.max_app_version} is lower than min_app_version {self.min_app_version}",
                        self.max_app_version,
                    )
                ],
            )
        return self


class Variant(_Strict):
    """One arm. Its position in ``variants`` is part of bucketing: keep the order once RUNNING."""

    key: Key = Field(description="Stable machine key, e.g. 'A'.")
    id: int | None = Field(
        default=None,
        ge=1,
        le=VARIANT_ID_MAX,
        description="Stable numeric id; absent: experiment id * 1000 + 1-based position.",
    )
    name: str = Field(min_length=1, max_length=200, description="Human name; ArkForge's variant_name.")
    description: OptionalText = ""
    weight: float = Field(gt=0, allow_inf_nan=False, description="Relative share; normalised to 10000 buckets.")
    config_overrides: JsonObject = Field(
        default_factory=dict, description="Deep-merged over the experiment's baseline_config for this variant."
    )
    control: bool = Field(
        default=False, description="The control that results compare against; absent on all: the first variant."
    )

    @property
    def variant_id(self) -> int:
        """The id, always set once the owning Experiment validated."""
        if self.id is None:
            raise RuntimeError(f"variant {self.key!r} has no id: validate it inside an Experiment")
        return self.id


class Experiment(_Strict):
    """One experiment of the registry, as written in tests.json or created through /apiv1/ab-tests."""

    key: Key = Field(description="Stable machine key; part of the hash input.")
    id: int = Field(ge=1, le=EXPERIMENT_ID_MAX, description="Stable numeric id (ArkForge's test_id).")
    name: str = Field(min_length=1, max_length=200, description="Human name; ArkForge's test_name (unique).")
    description: OptionalText = ""
    status: Status
    start_at: AwareDatetime | None = Field(default=None, description="Assign from this instant (inclusive).")
    end_at: AwareDatetime | None = Field(default=None, description="Stop assigning at this instant (exclusive).")
    targeting: Targeting = Field(default_factory=Targeting)
    coverage: float = Field(
        default=1.0, ge=0, le=1, allow_inf_nan=False, description="Share of eligible users that enter."
    )
    hash_seed: str | None = Field(
        default=None, pattern=SEED_PATTERN, description="Salt of the hash; absent: the key. New seed = new phase."
    )
    phase: int = Field(default=1, ge=1, description="Bumped with a new hash_seed when users may be reshuffled.")
    phase_started_at: AwareDatetime | None = Field(default=None, description="When the current phase began.")
    created_at: AwareDatetime | None = Field(default=None, description="When the experiment was created.")
    baseline_config: JsonObject = Field(
        default_factory=dict, description="Config everyone gets while the experiment is RUNNING or PAUSED."
    )
    variants: list[Variant] = Field(min_length=2, max_length=MAX_VARIANTS)
    metrics: list[MetricDefinition] | None = Field(
        default=None,
        max_length=MAX_METRICS,
        description="Metrics the results analyse; absent: every event as a proportion and a count, every tracked "
        "metric as a sum (docs/statistics.md).",
    )
    exposure_event: EventName | None = Field(
        default=None,
        description="Exposure rule: absent, a user is exposed at their first assignment; set, at their first event "
        "of this name after it. Results count only events from the exposure on.",
    )
    cuped_lookback_days: StrictInt = Field(
        default=DEFAULT_CUPED_LOOKBACK_DAYS,
        ge=0,
        le=MAX_CUPED_LOOKBACK_DAYS,
        description="CUPED covariate: each metric's value over this many whole UTC days before the exposure day "
        "(0: no CUPED).",
    )
    sequential_testing: StrictBool = Field(
        default=False, description="Also report always-valid (sequential) intervals and p-values: safe to peek."
    )

    @property
    def control(self) -> Variant:
        """The variant results compare against: the one marked ``control``, else the first."""
        return next((v for v in self.variants if v.control), self.variants[0])

    @property
    def rules(self) -> ExperimentRules:
        """What the stream workers' cumulative rollups need of this experiment."""
        return rules_of(self.metrics, self.cuped_lookback_days, self.exposure_event)

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        if self.hash_seed is None:
            self.hash_seed = self.key
        errors: list[InitErrorDetails] = []
        if self.start_at is not None and self.end_at is not None and self.start_at >= self.end_at:
            errors.append(
                field_error(("end_at",), "window_empty", "end_at must be later than start_at", str(self.end_at))
            )
        if self.phase > 1 and self.phase_started_at is None:
            errors.append(
                field_error(("phase_started_at",), "missing", "phase_started_at is required when phase > 1", None)
            )
        seen_keys: set[str] = set()
        seen_names: set[str] = set()
        explicit_ids = {v.id for v in self.variants if v.id is not None}
        seen_ids: set[int] = set()
        for i, variant in enumerate(self.variants):
            if variant.key in seen_keys:
                errors.append(
                    field_error(
                        ("variants", i, "key"), "duplicate_key", f"duplicate variant key {variant.key!r}", variant.key
                    )
                )
            if variant.name in seen_names:
                errors.append(
                    field_error(
                        ("variants", i, "name"),
                        "duplicate_name",
                        f"duplicate variant name {variant.name!r}",
                        variant.name,
                    )
                )
            seen_keys.add(variant.key)
            seen_names.add(variant.name)
            if variant.id is None:
                derived = self.id * 1000 + i + 1
                if derived > VARIANT_ID_MAX:
                    errors.append(
                        field_error(
                            ("variants", i, "id"),
                            "id_too_large",
                            f"derived id {derived} exceeds {VARIANT_ID_MAX}; give every variant an explicit id",
                            None,
                        )
                    )
                elif derived in explicit_ids:
                    errors.append(
                        field_error(
                            ("variants", i, "id"),
                            "id_collision",
                            f"derived id {derived} is taken by another variant; give every variant an explicit id",
                            None,
                        )
                    )
                variant.id = derived
            elif variant.id in seen_ids:
                errors.append(
                    field_error(("variants", i, "id"), "duplicate_id", f"duplicate variant id {variant.id}", variant.id)
                )
            seen_ids.add(variant.id)
        for i, count in enumerate(bucket_counts([v.weight for v in self.variants])):
            if count == 0:
                errors.append(
                    field_error(
                        ("variants", i, "weight"),
                        "weight_too_small",
                        f"weight gets 0 of {BUCKETS} buckets",
                        self.variants[i].weight,
                    )
                )
        if sum(v.control for v in self.variants) > 1:
            errors.append(
                field_error(("variants",), "multiple_controls", "at most one variant may be the control", None)
            )
        errors.extend(
            field_error(("metrics", *loc), code, message, None)
            for loc, code, message in check_metrics(self.metrics or [])
        )
        raise_field_errors("Experiment", errors)
        return self

    @property
    def seed(self) -> str:
        """The effective hash seed (``hash_seed`` or the key)."""
        return self.hash_seed or self.key

    def variant_by_key(self, key: str) -> Variant | None:
        return next((v for v in self.variants if v.key == key), None)

    def variant_by_id(self, variant_id: int) -> Variant | None:
        return next((v for v in self.variants if v.id == variant_id), None)


class Funnel(_Strict):
    """An ordered conversion path, counted per variant of the experiments it names."""

    key: Key
    name: str = Field(min_length=1, max_length=200)
    description: OptionalText = ""
    steps: list[EventName] = Field(min_length=2, max_length=20, description="Ordered event names.")
    conversion_window_seconds: int = Field(
        gt=0, le=90 * 86400, description="Time from the first step by which the last must happen."
    )
    experiment_keys: list[Key] | None = Field(
        default=None, description="Experiments to break the funnel down by; absent: every experiment."
    )

    @model_validator(mode="after")
    def _distinct_steps(self) -> Funnel:
        seen: set[str] = set()
        errors = []
        for i, step in enumerate(self.steps):
            if step in seen:
                message = f"step {step!r} repeats: each step is a different event"
                errors.append(field_error(("steps", i), "duplicate_step", message, step))
            seen.add(step)
        raise_field_errors("Funnel", errors)
        return self


class Manifest(_Strict):
    """tests.json: the experiments and funnels loaded into the registry on start."""

    version: Literal[1]
    experiments: list[Experiment] = Field(default_factory=list)
    funnels: list[Funnel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        errors: list[InitErrorDetails] = []
        keys: set[str] = set()
        ids: set[int] = set()
        names: set[str] = set()
        variant_ids: dict[int, str] = {}
        for i, exp in enumerate(self.experiments):
            if exp.key in keys:
                errors.append(
                    field_error(
                        ("experiments", i, "key"), "duplicate_key", f"duplicate experiment key {exp.key!r}", exp.key
                    )
                )
            if exp.id in ids:
                errors.append(
                    field_error(("experiments", i, "id"), "duplicate_id", f"duplicate experiment id {exp.id}", exp.id)
                )
            if exp.name in names:
                errors.append(
                    field_error(
                        ("experiments", i, "name"),
                        "duplicate_name",
                        f"duplicate experiment name {exp.name!r} (ArkForge test_name is unique)",
                        exp.name,
                    )
                )
            keys.add(exp.key)
            ids.add(exp.id)
            names.add(exp.name)
            for j, variant in enumerate(exp.variants):
                owner = variant_ids.get(variant.variant_id)
                if owner is not None and owner != exp.key:
                    errors.append(
                        field_error(
                            ("experiments", i, "variants", j, "id"),
                            "duplicate_id",
                            f"variant id {variant.variant_id} is also used by experiment {owner!r}",
                            variant.variant_id,
                        )
                    )
                variant_ids.setdefault(variant.variant_id, exp.key)
        funnel_keys: set[str] = set()
        for i, funnel in enumerate(self.funnels):
            if funnel.key in funnel_keys:
                errors.append(
                    field_error(
                        ("funnels", i, "key"), "duplicate_key", f"duplicate funnel key {funnel.key!r}", funnel.key
                    )
                )
            funnel_keys.add(funnel.key)
            for j, exp_key in enumerate(funnel.experiment_keys or []):
                if exp_key not in keys:
                    errors.append(
                        field_error(
                            ("funnels", i, "experiment_keys", j),
                            "unknown_experiment",
                            f"no experiment with key {exp_key!r}",
                            exp_key,
                        )
                    )
        raise_field_errors("Manifest", errors)
        return self

    def experiment(self, key: str) -> Experiment | None:
        return next((e for e in self.experiments if e.key == key), None)


class ManifestError(ValueError):
    """tests.json cannot be used; the message names the file and every bad field's JSON path."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file, raising ManifestError (``tests.json: experiments.1.id: ...``)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(name, [f"cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(name, [f"invalid JSON: {exc}"]) from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{field_path(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False, include_input=False)
        ]
        raise ManifestError(name, problems) from exc


# --------------------------------------------------------------------------------------------------
# JSON Schema of the manifest
# --------------------------------------------------------------------------------------------------

SCHEMA_PATH = Path(__file__).resolve().parent / "manifest.schema.json"


def manifest_schema_text() -> str:
    """The manifest's JSON Schema as committed: sorted keys, 2-space indent, trailing newline."""
    schema = Manifest.model_json_schema()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "description": (
            "abstream experiment manifest (tests.json). Generated by `python -m schemas.experiments`; "
            "cross-field rules (unique keys/ids/names, start_at < end_at, min <= max app version, "
            "no zero-bucket weight) are enforced by schemas.experiments.load_manifest."
        ),
    }
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def write_manifest_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the manifest's JSON Schema (``python -m schemas.experiments``)."""
    path.write_text(manifest_schema_text(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.experiments", description=write_manifest_schema.__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the file is stale")
    parser.add_argument("--out", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != manifest_schema_text():
            print(f"{args.out} is stale: run python -m schemas.experiments", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    print(f"wrote {write_manifest_schema(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
