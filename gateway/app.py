"""The Starlette gateway: both seed surfaces mounted over one core, health, OpenAPI, and the lifespan.

Thin by design: validate, assign, publish to Kafka, answer. It never writes ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from abstream.config import Settings
from gateway import arkforge, calicritters
from gateway.openapi import build_openapi
from gateway.plumbing import (
    AccessLogMiddleware,
    JSONResponse,
    api_error_handler,
    http_error_handler,
    unhandled_error_handler,
)
from gateway.publisher import Publisher
from gateway.registry import Registry
from gateway.routes import Endpoint
from gateway.service import RETRY_AFTER_S, GatewayCore
from schemas.errors import ApiError
from schemas.health import Liveness, Readiness

log = logging.getLogger(__name__)

ENDPOINTS: list[Endpoint] = [*calicritters.ENDPOINTS, *arkforge.ENDPOINTS]


def _version() -> str:
    try:
        return version("abstream")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


async def health_live(request: Request) -> Response:
    """The process is up (no dependency checks: restart me only if this fails)."""
    return JSONResponse({"status": "live"})


async def health_ready(request: Request) -> Response:
    """Ready to take traffic: Kafka connected and the experiment registry loaded."""
    core: GatewayCore = request.app.state.core
    checks = {"kafka": core.publisher.ready, "registry": core.registry.ready}
    ok = all(checks.values())
    body: dict[str, object] = {"status": "ready" if ok else "not_ready", "checks": checks}
    if core.registry.startup_error:
        body["error"] = core.registry.startup_error
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": RETRY_AFTER_S})


HEALTH_ENDPOINTS = [
    Endpoint("GET", "/health/live", health_live, "Liveness: the process answers", "health", responses={200: Liveness}),
    Endpoint(
        "GET",
        "/health/ready",
        health_ready,
        "Readiness: Kafka connected and the experiment registry loaded",
        "health",
        responses={200: Readiness, 503: Readiness},
        description="503, with the same body, until Kafka is first connected and the registry loaded (or when "
        "it failed to load: see `error`), and again while Kafka does not answer (a failed publish or the "
        "once-a-second broker check, until one succeeds).",
    ),
]


DEAD_LETTER_DRAIN_S = 3.0
"""At shutdown, how long dead letters still on their way get before the producer stops."""

GC_THRESHOLDS = (5_000, 10, 10)
"""The gateway's garbage-collector thresholds (Python's default is 700, 10, 10). Measured under
``abstream bench ingest`` (2-core box): with the defaults, every in-flight /v1/events request kept a few hundred
containers alive across its Kafka await (the parsed body, one result dict per event, dedup-key tuples), so
they survived into the old generations and set off ~2-3 full collections per second, 20-60 ms each (~20 % of
the gateway's CPU, and its p99). Since then the start-up heap is frozen (:func:`_tune_gc`), the parsed body is
freed before the await, and results are strings until the answer is serialised (``gateway/ingest.py``; the dedup
cache keeps one set of ids per user, or a lone id as the string itself): at ~700 requests/s per process a young
collection now runs about once in 5 s, so the threshold hardly matters any more (5,000 and 20,000 measured the
same within the box's noise)."""


async def _tune_gc(app: Starlette) -> None:
    """Set :data:`GC_THRESHOLDS`; once ready (every lazy import done, the registry loaded), move what is alive
    into the permanent generation, so that no collection traverses the ~60,000 objects of the modules again.
    Runs in the lifespan, so every server process (ABSTREAM_GATEWAY_WORKERS) does it."""
    gc.set_threshold(*GC_THRESHOLDS)
    core: GatewayCore = app.state.core
    await core.publisher.wait_ready()
    while not core.registry.ready:  # noqa: ASYNC110 - the registry exposes no awaitable readiness
        if core.registry.startup_error:
            return
        await asyncio.sleep(0.2)
    gc.collect()
    gc.freeze()


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        registry = Registry(settings, publisher)
        app.state.core = GatewayCore(settings, publisher, registry)
        await registry.start()  # a malformed tests.json stops start-up here
        await publisher.start()
        settle_gc = asyncio.create_task(_tune_gc(app), name="gc-tuning")
        try:
            yield
        finally:
            settle_gc.cancel()
            await app.state.core.drain_dead_letters(DEAD_LETTER_DRAIN_S)
            await registry.stop()
            await publisher.stop()
            await app.state.core.rollups.close()

    routes = [Route(ep.path, ep.handler, methods=[ep.method]) for ep in (*ENDPOINTS, *HEALTH_ENDPOINTS)]
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(AccessLogMiddleware)],
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            Exception: unhandled_error_handler,
        },
    )
    app.state.openapi = build_openapi([*ENDPOINTS, *HEALTH_ENDPOINTS], _version())
    return app
