"""How an experiment is analysed: its metrics, its exposure rule and its CUPED lookback.

One definition, shared by tests.json, the ArkForge create/edit API, the stream workers (which keep the
per-user sums these need) and the results core (which turns the sums into statistics).

A metric reads one *source* per user, counted from the user's exposure on:

* ``event``: events with that name (``/v1/events``, ``/apiv1/events``); the user's value is how many.
* ``tracked``: values tracked for this experiment with ``/apiv1/ab-tests/{id}/track`` under that
  metric name; the user's value is their sum.

and turns it into the user's value ``x`` by its type:

* ``proportion``: 1 if the user has the source at least once, else 0 (conversion rate).
* ``count``: the number of events (event sources only).
* ``sum``: the sum of the tracked values (tracked sources only).
* ``ratio``: the sum of one metric over the sum of another (``numerator`` / ``denominator``: keys of
  non-ratio metrics in the same list), analysed with the delta method.

With no ``metrics`` listed, every event name seen in the experiment is analysed as a proportion
(``conversion:<name>``) and a count (``count:<name>``), and every tracked metric as a sum
(``sum:<name>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from schemas.names import EventName, Key

MetricType = Literal["proportion", "count", "sum", "ratio"]
SourceKind = Literal["event", "tracked"]

DEFAULT_CUPED_LOOKBACK_DAYS = 14
MAX_CUPED_LOOKBACK_DAYS = 90
MAX_METRICS = 50


class MetricDefinition(BaseModel):
    """One metric of an experiment (see the module docstring for what each type measures)."""

    model_config = ConfigDict(extra="forbid")

    key: Key = Field(description="Stable key, unique within the experiment; results are keyed by it.")
    name: str | None = Field(default=None, max_length=200, description="Human name; absent: the key.")
    type: MetricType
    event: EventName | None = Field(default=None, description="proportion/count: the event name counted.")
    tracked: EventName | None = Field(
        default=None, description="proportion/sum: the metric_name tracked with /apiv1/ab-tests/{id}/track."
    )
    numerator: Key | None = Field(default=None, description="ratio: key of the numerator metric.")
    denominator: Key | None = Field(default=None, description="ratio: key of the denominator metric.")

    @model_validator(mode="after")
    def _shape(self) -> MetricDefinition:
        problem = None
        if self.type == "ratio":
            if self.numerator is None or self.denominator is None:
                problem = "a ratio metric needs numerator and denominator (keys of other metrics)"
            elif self.event is not None or self.tracked is not None:
                problem = "a ratio metric reads its numerator and denominator, not event or tracked"
        elif self.numerator is not None or self.denominator is not None:
            problem = f"numerator/denominator are for ratio metrics, not {self.type}"
        elif (self.event is None) == (self.tracked is None):
            problem = f"a {self.type} metric needs exactly one of event or tracked"
        elif self.type == "count" and self.tracked is not None:
            problem = "count reads events; for tracked values use sum (or proportion)"
        elif self.type == "sum" and self.event is not None:
            problem = "sum reads tracked values; for events use count (or proportion)"
        if problem:
            raise PydanticCustomError("invalid_metric", problem)
        return self

    @property
    def source(self) -> tuple[SourceKind, str]:
        """(kind, name) of the per-user source this (non-ratio) metric reads."""
        if self.event is not None:
            return ("event", self.event)
        if self.tracked is not None:
            return ("tracked", self.tracked)
        raise ValueError(f"ratio metric {self.key!r} has no single source")

    @property
    def label(self) -> str:
        return self.name or self.key


def check_metrics(metrics: Sequence[MetricDefinition]) -> list[tuple[tuple[int | str, ...], str, str]]:
    """Problems across a metrics list: (path inside the list, code, message); empty when it is usable."""
    problems: list[tuple[tuple[int | str, ...], str, str]] = []
    by_key: dict[str, MetricDefinition] = {}
    for i, metric in enumerate(metrics):
        if metric.key in by_key:
            problems.append(((i, "key"), "duplicate_key", f"duplicate metric key {metric.key!r}"))
        by_key.setdefault(metric.key, metric)
    for i, metric in enumerate(metrics):
        if metric.type != "ratio":
            continue
        for part in ("numerator", "denominator"):
            ref = getattr(metric, part)
            target = by_key.get(ref)
            if target is None:
                problems.append(((i, part), "unknown_metric", f"{part} {ref!r} is not a metric of this experiment"))
            elif target.type == "ratio":
                problems.append(((i, part), "ratio_of_ratio", f"{part} {ref!r} is itself a ratio metric"))
    return problems


# ----------------------------------------------------------------------------------------------------
# What the stream workers need of each experiment (a small, hashable summary of its analysis settings)
# ----------------------------------------------------------------------------------------------------

Source = tuple[int, str]
"""A per-user source as the workers key it: (0, event name) for events, (experiment id, metric name) for
values tracked for that experiment."""


@dataclass(frozen=True, slots=True)
class RatioPart:
    source_kind: SourceKind
    name: str
    type: MetricType  # proportion, count or sum: how the source becomes the user's value


@dataclass(frozen=True, slots=True)
class RatioRule:
    key: str
    numerator: RatioPart
    denominator: RatioPart


@dataclass(frozen=True, slots=True)
class ExperimentRules:
    """Per experiment: what the workers' cumulative rollups depend on besides the events themselves."""

    lookback_days: int = DEFAULT_CUPED_LOOKBACK_DAYS
    exposure_event: str | None = None
    ratios: tuple[RatioRule, ...] = ()


DEFAULT_RULES = ExperimentRules()


def rules_of(
    metrics: Sequence[MetricDefinition] | None, lookback_days: int, exposure_event: str | None
) -> ExperimentRules:
    """The workers' summary of an experiment's analysis settings."""
    by_key = {m.key: m for m in metrics or ()}
    ratios = []
    for m in metrics or ():
        if m.type != "ratio" or m.numerator not in by_key or m.denominator not in by_key:
            continue
        num, den = by_key[m.numerator], by_key[m.denominator]
        if num.type == "ratio" or den.type == "ratio":
            continue
        ratios.append(RatioRule(m.key, RatioPart(*num.source, num.type), RatioPart(*den.source, den.type)))
    return ExperimentRules(lookback_days, exposure_event, tuple(ratios))


def _default(key: str, type_: MetricType, **source: str) -> MetricDefinition:
    # built without validation: default keys carry the event name, whose ':' a written key may not use
    return MetricDefinition.model_construct(key=key, name=None, type=type_, numerator=None, denominator=None,
                                            **{"event": None, "tracked": None, **source})  # fmt: skip


def default_metrics(sources: Sequence[tuple[SourceKind, str]]) -> list[MetricDefinition]:
    """The metrics analysed when an experiment lists none: per event name a proportion and a count, per
    tracked metric a sum (sources in the order given)."""
    out: list[MetricDefinition] = []
    for kind, name in sources:
        if kind == "event":
            out.append(_default(f"conversion:{name}", "proportion", event=name))
            out.append(_default(f"count:{name}", "count", event=name))
        else:
            out.append(_default(f"sum:{name}", "sum", tracked=name))
    return out
