"""Experiments: the manifest (tests.json), both seed surfaces' experiment and assignment payloads,
and the ``assignments`` Kafka record. The one definition of each; routes and workers import these.

The manifest rejects anything it does not know (``extra="forbid"``) because a typo in tests.json
(``"wieght"``) would otherwise silently change who sees what. API requests ignore unknown fields,
as the seed servers did, so existing clients that send extras keep working.

``python -m schemas.experiments`` regenerates ``schemas/manifest.schema.json`` (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from packaging.version import InvalidVersion, Version
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from abstream.config import Settings
from schemas.analysis import (
    DEFAULT_CUPED_LOOKBACK_DAYS,
    MAX_CUPED_LOOKBACK_DAYS,
    MAX_METRICS,
    ExperimentRules,
    MetricDefinition,
    check_metrics,
    rules_of,
)
from schemas.errors import field_path
from schemas.names import EVENT_NAME_PATTERN, KEY_PATTERN, SEED_PATTERN, EventName, Key  # noqa: F401 (re-exported)

# --------------------------------------------------------------------------------------------------
# Limits and patterns (shared with gateway/assignment.py and the JSON Schema)
# --------------------------------------------------------------------------------------------------

BUCKETS = 10_000
"""Every experiment's hash space: variants own contiguous ranges of 0..BUCKETS-1."""

EXPERIMENT_ID_MAX = 2**32 - 1
VARIANT_ID_MAX = 2**32 - 1
"""Both ids are UInt32 in ClickHouse (clickhouse/0001_registry.sql, 0002_assignments.sql)."""
MAX_VARIANTS = 100
ABSOLUTE_MAX_ID_LENGTH = 1024
"""Hard cap for ids in the JSON Schema; the effective limit is ``Settings.max_id_length``."""

Platform = Literal["ios", "android"]
Surface = Literal["v1", "apiv1"]

JsonObject = dict[str, Any]


class Status(StrEnum):
    """Lifecycle of an experiment. Only RUNNING assigns; PAUSED keeps serving its baseline config."""

    DRAFT = "DRAFT"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"


# --------------------------------------------------------------------------------------------------
# Version comparison (targeting needs it at validation time and at assignment time)
# --------------------------------------------------------------------------------------------------


class InvalidVersionString(ValueError):
    """Neither PEP 440 nor the numeric-prefix fallback can read the string."""


_FALLBACK_RE = re.compile(r"^\s*[vV]?(\d+(?:\.\d+)*)(.*)$", re.DOTALL)
_SUFFIX_TOKEN_RE = re.compile(r"\d+|[A-Za-z]+")


@lru_cache(maxsize=4096)
def _pep440(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@lru_cache(maxsize=4096)
def _fallback_key(text: str) -> tuple[tuple[int, ...], int, tuple[tuple[int, int | str], ...]]:
    """Semver-like key for strings PEP 440 rejects (``1.2.3 (45)``, ``2024.01.05-hotfix``).

    Numeric release first (trailing zeros ignored); anything after it, up to a ``+build`` part, is a
    pre-release tag, so ``1.2.3-hotfix`` < ``1.2.3``; tags compare token by token, numbers below words.
    """
    match = _FALLBACK_RE.match(text)
    if match is None:
        raise InvalidVersionString(f"not a version: {text!r}")
    release = tuple(int(part) for part in match.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    suffix = match.group(2).split("+", 1)[0]
    tokens = tuple((0, int(t)) if t.isdigit() else (1, t.lower()) for t in _SUFFIX_TOKEN_RE.findall(suffix))
    return release, (0 if tokens else 1), tokens


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1. PEP 440 when both parse (``0.10.0`` > ``0.9.1``, ``1.2.3-beta`` < ``1.2.3``), else the
    numeric-prefix fallback for both. Raises InvalidVersionString if either has no leading number."""
    va, vb = _pep440(a), _pep440(b)
    if va is not None and vb is not None:
        return (va > vb) - (va < vb)
    ka, kb = _fallback_key(a), _fallback_key(b)
    return (ka > kb) - (ka < kb)


def is_valid_version(text: str) -> bool:
    """True when ``compare_versions`` can use the string."""
    if _pep440(text) is not None:
        return True
    try:
        _fallback_key(text)
    except InvalidVersionString:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Weight normalisation (validation rejects variants that would get no bucket)
# --------------------------------------------------------------------------------------------------


def bucket_counts(weights: Sequence[float]) -> list[int]:
    """Integer bucket counts summing to BUCKETS, proportional to ``weights`` (largest remainder).

    Arithmetic is exact on each weight's shortest decimal form (``repr``: 0.34 is 34/100), so every
    language gets the same counts; leftover buckets go to the largest remainders, ties to the earlier variant.
    """
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact, Fraction(0))
    if total <= 0 or any(w <= 0 for w in exact):
        raise ValueError("weights must be positive")
    shares = [w * BUCKETS / total for w in exact]
    counts = [int(s) for s in shares]  # floor: shares are positive
    leftover = BUCKETS - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1
    return counts


def bucket_bounds(weights: Sequence[float]) -> list[int]:
    """Exclusive upper bounds of each variant's range: variant i owns [bounds[i-1], bounds[i])."""
    bounds: list[int] = []
    acc = 0
    for count in bucket_counts(weights):
        acc += count
        bounds.append(acc)
    return bounds


# --------------------------------------------------------------------------------------------------
# Helpers for validators that name the exact bad field
# --------------------------------------------------------------------------------------------------


def _error(loc: tuple[int | str, ...], code: str, message: str, value: Any) -> InitErrorDetails:
    # Braces in user values must not be read as template fields.
    safe = message.replace("{", "{{").replace("}", "}}")
    return InitErrorDetails(type=PydanticCustomError(code, safe), loc=loc, input=value)


def _raise(title: str, errors: list[InitErrorDetails]) -> None:
    """Raise errors located below the model being validated; pydantic prefixes the outer path."""
    if errors:
        raise ValidationError.from_exception_data(title, errors)


@lru_cache(maxsize=1)
def _env_settings() -> Settings:
    return Settings.from_env()


def _id_limit(context: Any) -> int:
    """The effective id length limit: ``context={"settings": s}`` from the route, else the environment's."""
    if isinstance(context, dict):
        settings = context.get("settings")
        if isinstance(settings, Settings):
            return settings.max_id_length
        limit = context.get("max_id_length")
        if isinstance(limit, int):
            return limit
    return _env_settings().max_id_length


def _check_id_length(value: str, info: ValidationInfo) -> str:
    if value.isspace():
        raise PydanticCustomError("blank_string", "must contain a non-space character")
    limit = _id_limit(info.context)
    if len(value) > limit:
        raise PydanticCustomError(
            "string_too_long", "String should have at most {max_length} characters", {"max_length": limit}
        )
    return value


IdStr = Annotated[
    StrictStr, StringConstraints(min_length=1, max_length=ABSOLUTE_MAX_ID_LENGTH), AfterValidator(_check_id_length)
]
"""A user/session/install id: a JSON string, not blank, at most ``Settings.max_id_length`` characters."""

OptionalText = Annotated[str, StringConstraints(max_length=2000)]


# --------------------------------------------------------------------------------------------------
# Manifest (tests.json)
# --------------------------------------------------------------------------------------------------


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
            _error((name,), "invalid_version", f"not a version: {value!r}", value)
            for name, value in (("min_app_version", self.min_app_version), ("max_app_version", self.max_app_version))
            if value is not None and not is_valid_version(value)
        ]
        _raise("Targeting", errors)
        if (
            self.min_app_version is not None
            and self.max_app_version is not None
            and compare_versions(self.min_app_version, self.max_app_version) > 0
        ):
            _raise(
                "Targeting",
                [
                    _error(
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
    cuped_lookback_days: int = Field(
        default=DEFAULT_CUPED_LOOKBACK_DAYS,
        ge=0,
        le=MAX_CUPED_LOOKBACK_DAYS,
        description="CUPED covariate: each metric's value over this many whole UTC days before the exposure day "
        "(0: no CUPED).",
    )
    sequential_testing: bool = Field(
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
            errors.append(_error(("end_at",), "window_empty", "end_at must be later than start_at", str(self.end_at)))
        if self.phase > 1 and self.phase_started_at is None:
            errors.append(_error(("phase_started_at",), "missing", "phase_started_at is required when phase > 1", None))
        seen_keys: set[str] = set()
        seen_names: set[str] = set()
        explicit_ids = {v.id for v in self.variants if v.id is not None}
        seen_ids: set[int] = set()
        for i, variant in enumerate(self.variants):
            if variant.key in seen_keys:
                errors.append(
                    _error(
                        ("variants", i, "key"), "duplicate_key", f"duplicate variant key {variant.key!r}", variant.key
                    )
                )
            if variant.name in seen_names:
                errors.append(
                    _error(
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
                        _error(
                            ("variants", i, "id"),
                            "id_too_large",
                            f"derived id {derived} exceeds {VARIANT_ID_MAX}; give every variant an explicit id",
                            None,
                        )
                    )
                elif derived in explicit_ids:
                    errors.append(
                        _error(
                            ("variants", i, "id"),
                            "id_collision",
                            f"derived id {derived} is taken by another variant; give every variant an explicit id",
                            None,
                        )
                    )
                variant.id = derived
            elif variant.id in seen_ids:
                errors.append(
                    _error(("variants", i, "id"), "duplicate_id", f"duplicate variant id {variant.id}", variant.id)
                )
            seen_ids.add(variant.id)
        for i, count in enumerate(bucket_counts([v.weight for v in self.variants])):
            if count == 0:
                errors.append(
                    _error(
                        ("variants", i, "weight"),
                        "weight_too_small",
                        f"weight gets 0 of {BUCKETS} buckets",
                        self.variants[i].weight,
                    )
                )
        if sum(v.control for v in self.variants) > 1:
            errors.append(_error(("variants",), "multiple_controls", "at most one variant may be the control", None))
        errors.extend(
            _error(("metrics", *loc), code, message, None) for loc, code, message in check_metrics(self.metrics or [])
        )
        _raise("Experiment", errors)
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
                errors.append(_error(("steps", i), "duplicate_step", message, step))
            seen.add(step)
        _raise("Funnel", errors)
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
                    _error(("experiments", i, "key"), "duplicate_key", f"duplicate experiment key {exp.key!r}", exp.key)
                )
            if exp.id in ids:
                errors.append(
                    _error(("experiments", i, "id"), "duplicate_id", f"duplicate experiment id {exp.id}", exp.id)
                )
            if exp.name in names:
                errors.append(
                    _error(
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
                        _error(
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
                    _error(("funnels", i, "key"), "duplicate_key", f"duplicate funnel key {funnel.key!r}", funnel.key)
                )
            funnel_keys.add(funnel.key)
            for j, exp_key in enumerate(funnel.experiment_keys or []):
                if exp_key not in keys:
                    errors.append(
                        _error(
                            ("funnels", i, "experiment_keys", j),
                            "unknown_experiment",
                            f"no experiment with key {exp_key!r}",
                            exp_key,
                        )
                    )
        _raise("Manifest", errors)
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
# ArkForge surface: /apiv1/ab-tests
# --------------------------------------------------------------------------------------------------

_TOLERANT = ConfigDict(extra="ignore")
_SLUG_RE = re.compile(r"[^a-z0-9]+")


def key_from_name(name: str, experiment_id: int, taken: Iterable[str] = ()) -> str:
    """An experiment key for an ArkForge test: the test_name slugged (``Homepage Button!`` -> ``homepage_button``),
    suffixed ``_<id>`` when taken, ``test_<id>`` when nothing sluggable is left."""
    slug = _SLUG_RE.sub("_", name.lower()).strip("_")[:48].strip("_")
    taken_set = set(taken)
    if not slug:
        return f"test_{experiment_id}"
    if slug in taken_set:
        return f"{slug}_{experiment_id}"
    return slug


class ABVariantCreate(BaseModel):
    model_config = _TOLERANT

    variant_name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    control: bool = Field(default=False, description="The control results compare against (default: the first).")


class ABTestCreate(BaseModel):
    """Body of POST /apiv1/ab-tests (seed field names)."""

    model_config = _TOLERANT

    test_name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    variants: list[ABVariantCreate] = Field(min_length=2, max_length=MAX_VARIANTS)
    metrics: list[MetricDefinition] | None = Field(default=None, max_length=MAX_METRICS)
    exposure_event: EventName | None = None
    cuped_lookback_days: int = Field(default=DEFAULT_CUPED_LOOKBACK_DAYS, ge=0, le=MAX_CUPED_LOOKBACK_DAYS)
    sequential_testing: bool = False

    @model_validator(mode="after")
    def _distinct_names(self) -> ABTestCreate:
        seen: set[str] = set()
        errors: list[InitErrorDetails] = []
        for i, variant in enumerate(self.variants):
            if variant.variant_name in seen:
                errors.append(
                    _error(
                        ("variants", i, "variant_name"),
                        "duplicate_name",
                        f"duplicate variant_name {variant.variant_name!r}",
                        variant.variant_name,
                    )
                )
            seen.add(variant.variant_name)
        counts = bucket_counts([v.weight for v in self.variants])
        errors.extend(
            _error(("variants", i, "weight"), "weight_too_small", f"weight gets 0 of {BUCKETS} buckets", v.weight)
            for i, (v, c) in enumerate(zip(self.variants, counts, strict=True))
            if c == 0
        )
        _raise("ABTestCreate", errors)
        return self

    def to_experiment(self, experiment_id: int, now: datetime, taken_keys: Iterable[str] = ()) -> Experiment:
        """The registry entry for this test: RUNNING at once (the seed assigns right after creation),
        key from ``key_from_name``, variants keyed A, B, C... (then V27...) with derived ids."""
        key = key_from_name(self.test_name, experiment_id, taken_keys)
        return Experiment(
            key=key,
            id=experiment_id,
            name=self.test_name,
            description=self.description or "",
            status=Status.RUNNING,
            hash_seed=key,
            phase_started_at=now,
            created_at=now,
            variants=[
                Variant(
                    key=chr(ord("A") + i) if i < 26 else f"V{i + 1}",
                    name=v.variant_name,
                    description=v.description or "",
                    weight=v.weight,
                    control=v.control,
                )
                for i, v in enumerate(self.variants)
            ],
            metrics=self.metrics,
            exposure_event=self.exposure_event,
            cuped_lookback_days=self.cuped_lookback_days,
            sequential_testing=self.sequential_testing,
        )


class ABVariantOut(BaseModel):
    """A variant as GET /apiv1/ab-tests shows it: the seed's ab_variants columns plus ``key``."""

    id: int
    test_id: int
    variant_name: str
    description: str | None
    weight: float = Field(description="Normalised share (weights of a test sum to 1).")
    created_at: datetime | None
    key: str
    is_control: bool = Field(description="The variant results compare against.")


class ABTestOut(BaseModel):
    """A test as GET /apiv1/ab-tests(/{test_id}) shows it: the seed's ab_tests columns plus status and key."""

    id: int
    test_name: str
    description: str | None
    created_at: datetime | None
    status: Status
    key: str
    phase: int = Field(description="Current phase: a new phase (new hash seed) re-randomises users.")
    variants: list[ABVariantOut]
    metrics: list[MetricDefinition] | None = Field(description="Metrics results analyse; null: the default set.")
    exposure_event: str | None
    cuped_lookback_days: int
    sequential_testing: bool

    @classmethod
    def from_experiment(cls, experiment: Experiment) -> ABTestOut:
        created = experiment.created_at or experiment.start_at or experiment.phase_started_at
        total = sum(v.weight for v in experiment.variants)
        return cls(
            id=experiment.id,
            test_name=experiment.name,
            description=experiment.description,
            created_at=created,
            status=experiment.status,
            key=experiment.key,
            phase=experiment.phase,
            variants=[
                ABVariantOut(
                    id=v.variant_id,
                    test_id=experiment.id,
                    variant_name=v.name,
                    description=v.description,
                    weight=v.weight / total,
                    created_at=created,
                    key=v.key,
                    is_control=v is experiment.control,
                )
                for v in experiment.variants
            ],
            metrics=experiment.metrics,
            exposure_event=experiment.exposure_event,
            cuped_lookback_days=experiment.cuped_lookback_days,
            sequential_testing=experiment.sequential_testing,
        )


class ABAssignRequest(BaseModel):
    """Body of POST /apiv1/ab-tests/{test_id}/assign."""

    model_config = _TOLERANT

    user_id: IdStr


class ABAssignResponse(BaseModel):
    """Answer of POST /apiv1/ab-tests/{test_id}/assign. ``assigned`` false (variant fields null) when the
    user is not in the test; ``reason`` says why (see gateway.assignment.decide)."""

    test_id: int
    test_name: str
    user_id: str
    assigned: bool
    variant_id: int | None
    variant_name: str | None
    variant_key: str | None
    phase: int
    reason: str | None = None
    assignment_version: str


# --------------------------------------------------------------------------------------------------
# Calicritters surface: POST /v1/assignment
# --------------------------------------------------------------------------------------------------


class AssignmentRequest(BaseModel):
    """Body of POST /v1/assignment. Validate with ``context={"settings": settings}`` for the id limit."""

    model_config = _TOLERANT

    anonymous_user_id: IdStr
    platform: Platform | None = None
    app_version: IdStr | None = None
    session_id: IdStr | None = None
    install_id: IdStr | None = None


class AssignmentEntry(BaseModel):
    experiment_key: str
    experiment_id: int
    variant_key: str
    variant_id: int
    variant_name: str
    phase: int


class AssignmentResponse(BaseModel):
    """Answer of POST /v1/assignment: the user's assignments (ascending experiment id) and merged config."""

    anonymous_user_id: str
    assignments: list[AssignmentEntry]
    config: JsonObject
    assignment_version: str
    generated_at: datetime


# --------------------------------------------------------------------------------------------------
# Kafka: the `assignments` topic (key = user id)
# --------------------------------------------------------------------------------------------------


class AssignmentRecord(BaseModel):
    """One exposure-to-assignment fact, published by the gateway, joined onto events by the workers.

    Readers ignore unknown fields so producers can add optional ones without bumping ``v``.
    """

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    user_id: str
    experiment_key: str
    experiment_id: int
    variant_key: str
    variant_id: int
    phase: int
    assignment_version: str
    assigned_at: int = Field(description="Epoch milliseconds (UTC).")
    platform: Platform | None = None
    app_version: str | None = None
    surface: Surface

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | str) -> AssignmentRecord:
        return cls.model_validate(orjson.loads(data))


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
