"""The Starlette gateway: routes of both seed surfaces mounted over one core, and the lifespan.

Thin by design: validate, assign, publish to Kafka, answer. It never writes ClickHouse.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from abstream.config import Settings
from gateway.publisher import Publisher

log = logging.getLogger(__name__)


async def health_live(request: Request) -> Response:
    """The process is up (no dependency checks: restart me only if this fails)."""
    return JSONResponse({"status": "live"})


async def health_ready(request: Request) -> Response:
    """Ready to take traffic: Kafka connected."""
    publisher: Publisher = request.app.state.publisher
    checks = {"kafka": publisher.ready}
    ok = all(checks.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        publisher = Publisher(settings)
        app.state.settings = settings
        app.state.publisher = publisher
        await publisher.start()
        try:
            yield
        finally:
            await publisher.stop()

    routes = [
        Route("/health/live", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def run(settings: Settings) -> None:
    """`abstream gateway`: serve with uvicorn (uvloop + httptools where installed)."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )
