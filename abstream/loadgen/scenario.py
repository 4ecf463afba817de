"""A loadgen scenario: who the users are, how they behave, and each experiment's true effect per variant.

Scenarios are TOML files (see ``abstream/loadgen/scenarios/``); ``--scenario ci`` names a shipped one. The
behaviour model is deliberately simple enough that every metric's expectation has a closed form
(:mod:`abstream.loadgen.truth`), so "the true effect" is a number, not another simulation.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHIPPED = Path(__file__).parent / "scenarios"

Behaviour = Literal["sessions", "conversion", "revenue"]
"""What a variant can change: sessions (each starts with app_open; workouts follow), the chance to buy, the
mean purchase value."""


class ScenarioError(ValueError):
    """The scenario file cannot be used: the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    weight: float = Field(default=1.0, gt=0)
    control: bool = False
    effects: dict[Behaviour, float] = Field(
        default_factory=dict, description="Relative change of each behaviour against no effect (0.1: +10%)."
    )

    @model_validator(mode="after")
    def _effects_keep_rates_positive(self) -> VariantSpec:
        for what, effect in self.effects.items():
            if effect <= -1:
                raise ValueError(f"effect on {what} must be > -1 (it multiplies a rate by 1 + effect)")
        return self


class ExperimentSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    variants: list[VariantSpec] = Field(min_length=2, max_length=10)
    sequential_testing: bool = False

    @model_validator(mode="after")
    def _one_control(self) -> ExperimentSpec:
        if sum(v.control for v in self.variants) > 1:
            raise ValueError("at most one variant is the control (default: the first)")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variant names must be unique")
        return self

    @property
    def control(self) -> VariantSpec:
        return next((v for v in self.variants if v.control), self.variants[0])

    def share(self, variant: VariantSpec) -> float:
        return variant.weight / sum(v.weight for v in self.variants)


class BehaviourSpec(_Strict):
    sessions_per_day: float = Field(default=1.0, gt=0, description="Mean of the users' daily session rate λ.")
    activity_shape: float = Field(default=2.0, gt=0, description="Gamma shape of λ across users (spread).")
    test_sessions: float = Field(default=2.0, gt=0, description="Sessions in the test period per unit of λ.")
    workout_share: float = Field(default=0.6, ge=0, le=1, description="Sessions with workout_started.")
    submit_share: float = Field(default=0.7, ge=0, le=1, description="Workouts then session_submitted.")
    purchase_share: float = Field(default=0.15, ge=0, le=1, description="Users who buy in the test period.")
    history_purchase_share: float = Field(default=0.05, ge=0, le=1, description="Users who bought before it.")
    revenue_mean: float = Field(default=12.0, gt=0, description="Mean purchase value (log-normal).")
    revenue_sigma: float = Field(default=0.8, ge=0, description="Log-normal sigma of purchase values.")
    arkforge_share: float = Field(default=0.5, ge=0, le=1, description="Users on /apiv1; the rest on /v1.")
    gzip_share: float = Field(default=0.3, ge=0, le=1, description="Requests sent with Content-Encoding: gzip.")
    retry_share: float = Field(default=0.05, ge=0, le=1, description="Requests sent again (a lost answer).")
    late_share: float = Field(default=0.1, ge=0, le=1, description="Test-period sessions held and sent last.")
    skewed_share: float = Field(default=0.1, ge=0, le=1, description="Devices whose clock is off (minutes-hours).")
    broken_clock_share: float = Field(
        default=0.01, ge=0, le=1, description="Devices an hour fast: every event refused (the skew guard)."
    )


class Scenario(_Strict):
    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_-]+$")
    description: str = ""
    seed: int = 1
    users: int = Field(default=1000, ge=1)
    days: int = Field(default=14, ge=0, le=28, description="Days of pre-exposure history (ABSTREAM_MAX_EVENT_AGE_S).")
    rate: float = Field(default=2000, gt=0, description="Events per second, whole run.")
    concurrency: int = Field(default=32, ge=1, le=1000, description="Users in flight at once.")
    behaviour: BehaviourSpec = Field(default_factory=BehaviourSpec)
    experiments: list[ExperimentSpec] = Field(min_length=1, max_length=10)

    @model_validator(mode="after")
    def _probabilities_stay_probabilities(self) -> Scenario:
        if len({e.name for e in self.experiments}) != len(self.experiments):
            raise ValueError("experiment names must be unique")
        top = self.behaviour.purchase_share
        for exp in self.experiments:
            top *= max(1 + v.effects.get("conversion", 0.0) for v in exp.variants)
        if top > 1:
            raise ValueError("purchase_share times the largest conversion effects exceeds 1")
        return self

    def with_overrides(self, **values: object) -> Scenario:
        """The scenario with command-line overrides (None: keep the file's value)."""
        changes = {k: v for k, v in values.items() if v is not None}
        return Scenario.model_validate({**self.model_dump(), **changes}) if changes else self


def load(ref: str) -> Scenario:
    """A scenario by shipped name (``ci``, ``default``, ``aa``) or by path to a TOML file."""
    path = SHIPPED / f"{ref}.toml" if "/" not in ref and not ref.endswith(".toml") else Path(ref)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml")))
        raise ScenarioError(f"{ref}: no such scenario file (shipped: {names})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return Scenario.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not TOML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ScenarioError(f"{path}: {where}: {first['msg']}") from exc
