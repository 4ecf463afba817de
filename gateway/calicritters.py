"""The Calicritters surface (/v1/...): a thin adapter over gateway.service."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from gateway import metrics
from gateway.auth import require_metrics
from gateway.ingest import ingest_v1
from gateway.plumbing import JSONResponse, note_user, read_json
from gateway.query import parse_query
from gateway.results import parse_level
from gateway.routes import Endpoint
from gateway.service import GatewayCore, records_refusals
from schemas.assignment import AssignmentRequest, AssignmentResponse
from schemas.errors import ApiError, ErrorResponse
from schemas.events import IngestResponse, V1EventsRequest
from schemas.metrics import (
    MAX_DAILY_SPAN_DAYS,
    Daily,
    DailyQuery,
    Experiments,
    ExperimentsQuery,
    Funnels,
    FunnelsQuery,
    Summary,
)


def _core(request: Request) -> GatewayCore:
    return request.app.state.core  # type: ignore[no-any-return]


async def post_assignment(request: Request) -> Response:
    core = _core(request)
    payload = await read_json(request, core.settings)
    note_user(request, payload.get("anonymous_user_id") if isinstance(payload, dict) else None)
    return JSONResponse(await core.assign_v1(payload))


@records_refusals("v1")
async def post_events(request: Request) -> Response:
    core = _core(request)
    payload = await read_json(request, core.settings, per_event=True)
    note_user(request, payload.get("anonymous_user_id") if isinstance(payload, dict) else None)
    result = core.validate(ingest_v1, payload)
    # Free the parsed body now rather than after the Kafka await: kept alive across it, every in-flight
    # request's hundreds of dicts survive into the collector's older generations (measured: +5% req/s).
    del payload
    return JSONResponse(await core.ingest(result))


async def get_summary(request: Request) -> Response:
    core = _core(request)
    parse_query(_NoQuery, request.query_params)
    core.require_registry()
    return JSONResponse(await metrics.summary(core.rollups, core.registry.state.experiments))


async def get_daily(request: Request) -> Response:
    core = _core(request)
    require_metrics(request, core.settings)
    query = parse_query(DailyQuery, request.query_params)
    return JSONResponse(await metrics.daily(core.rollups, query))


async def get_experiments(request: Request) -> Response:
    core = _core(request)
    require_metrics(request, core.settings)
    query = parse_query(ExperimentsQuery, request.query_params)
    level = parse_level(query.level)
    core.require_registry()
    if query.experiment is not None:
        selected = [core.experiment_by_ref(query.experiment)]
    else:
        selected = list(core.registry.state.experiments)
    return JSONResponse(await metrics.experiments_metrics(core.rollups, selected, level))


async def get_funnels(request: Request) -> Response:
    core = _core(request)
    require_metrics(request, core.settings)
    query = parse_query(FunnelsQuery, request.query_params)
    defs = metrics.manifest_funnels(str(core.settings.manifest_file))
    if query.funnel is not None:
        defs = tuple(f for f in defs if f.key == query.funnel)
        if not defs:
            raise ApiError(404, "funnel_not_found", f"no funnel {query.funnel!r} in tests.json")
    core.require_registry()
    experiment = core.experiment_by_ref(query.experiment) if query.experiment is not None else None
    return JSONResponse(await metrics.funnels(core.rollups, defs, experiment, core.registry.state.experiments))


class _NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _q(name: str, description: str, schema: dict[str, object] | None = None) -> dict[str, object]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}  # fmt: skip


ERRORS = {400: ErrorResponse, 413: ErrorResponse, 415: ErrorResponse, 503: ErrorResponse}
METRICS_ERRORS = {400: ErrorResponse, 401: ErrorResponse, 403: ErrorResponse, 503: ErrorResponse}
_METRICS_AUTH = (
    "Needs `Authorization: Bearer <ABSTREAM_METRICS_TOKEN>`: 401 without it, 403 with another token (the admin "
    "token too). Served from the rollups; 503 with Retry-After while ClickHouse cannot be read."
)

ENDPOINTS = [
    Endpoint(
        "POST",
        "/v1/assignment",
        post_assignment,
        "Assign a user to every eligible RUNNING experiment and return the merged config",
        "calicritters",
        request=AssignmentRequest,
        responses={200: AssignmentResponse, **ERRORS},
        description="Sticky (deterministic) weighted bucketing with targeting; every assignment is published "
        "to the `assignments` topic before the answer (503 with Retry-After when Kafka does not acknowledge).",
    ),
    Endpoint(
        "POST",
        "/v1/events",
        post_events,
        "Ingest a batch of events with per-event accept/reject",
        "calicritters",
        request=V1EventsRequest,
        responses={200: IngestResponse, **ERRORS},
        description="One bad event never rejects its neighbours. Answered after Kafka acknowledged every "
        "accepted event; `Content-Encoding: gzip` accepted.",
    ),
    Endpoint(
        "GET", "/v1/metrics/summary", get_summary, "Dashboard summary: events, active users, experiments (public)",
        "calicritters", responses={200: Summary, 400: ErrorResponse, 503: ErrorResponse},
        description="Aggregates only, never a user id. Windows are UTC days: today, the last 7 and 30 days.",
    ),
    Endpoint(
        "GET", "/v1/metrics/daily", get_daily, "Events and unique users per day, event, platform and app version",
        "calicritters", responses={200: Daily, **METRICS_ERRORS}, metrics=True,
        description=f"{_METRICS_AUTH} Range: at most {MAX_DAILY_SPAN_DAYS} days, default the last 30.",
        query=(
            _q("from", "First UTC day, inclusive (YYYY-MM-DD); default to - 29", {"type": "string", "format": "date"}),
            _q("to", "Last UTC day, inclusive; default today", {"type": "string", "format": "date"}),
            _q("event_name", "Only this event"),
            _q("platform", "Only this platform", {"type": "string", "enum": ["ios", "android", "unknown"]}),
            _q("app_version", "Only this app version"),
        ),
    ),
    Endpoint(
        "GET", "/v1/metrics/experiments", get_experiments,
        "Per experiment and variant: exposures per day and to date, every metric's results", "calicritters",
        responses={200: Experiments, 404: ErrorResponse, **METRICS_ERRORS}, metrics=True,
        description=_METRICS_AUTH,
        query=(_q("experiment", "Only this experiment (id or key)"),
               _q("level", "Confidence level: 0.90, 0.95 (default), 0.99")),
    ),
    Endpoint(
        "GET", "/v1/metrics/funnels", get_funnels,
        "Per funnel step: users, conversion with Wilson 95% intervals; per variant against the control",
        "calicritters", responses={200: Funnels, 404: ErrorResponse, **METRICS_ERRORS}, metrics=True,
        description=_METRICS_AUTH,
        query=(_q("funnel", "Only this funnel (its key in tests.json)"),
               _q("experiment", "Break the funnels down by this experiment's variants (id or key)")),
    ),
]  # fmt: skip
