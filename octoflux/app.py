"""`create_app(settings)`: the FastAPI app around one `GenerationService`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

from octoflux.api.common import health, playground
from octoflux.api.common.body_limit import BodySizeLimit, octoai_body
from octoflux.api.common.cors import install_cors
from octoflux.api.common.request_log import RequestContext
from octoflux.api.octoai import assets, events
from octoflux.api.octoai import routes as octoai
from octoflux.api.octoai.errors import install_error_handlers
from octoflux.api.openai import routes as openai
from octoflux.api.openai.errors import too_large_body, unrouted_error
from octoflux.core.codec import configure_pillow
from octoflux.core.engine_factory import EngineFactory, build_engine
from octoflux.core.service import GenerationService
from octoflux.settings import Settings

__all__ = ["build_engine", "create_app"]


def too_large_body_for(path: str, message: str) -> dict:
    return too_large_body(message) if openai.is_openai_path(path) else octoai_body(message)


async def unrouted_in_dialect(request: Request, exc: StarletteHTTPException) -> Response:
    """404s and 405s from the router, in the error shape of the API the path belongs to."""
    if openai.is_openai_path(request.url.path):
        return unrouted_error(request, exc)
    return await http_exception_handler(request, exc)


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = build_engine,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; the model loads in the background once it starts (`/readyz` says when it is ready).

    `on_load_failure(message)` is called if the model cannot load (the CLI exits non-zero then).
    """
    configure_pillow(settings.max_image_pixels)
    service = GenerationService(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.load_in_background(on_load_failure)
        service.start_webhooks()
        keeper = asyncio.ensure_future(service.keep_state())
        yield
        keeper.cancel()
        # Under `octoflux serve` SIGTERM has drained already; this covers any other way of stopping.
        await service.close()

    app = FastAPI(title="octoflux", summary="OctoAI-compatible FLUX.1-dev server", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    app.add_exception_handler(StarletteHTTPException, unrouted_in_dialect)
    app.include_router(health.router)
    app.include_router(octoai.router)
    app.include_router(events.router)
    app.include_router(assets.router)
    app.include_router(openai.router)
    app.include_router(playground.router)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=int(settings.max_body_mb * 2**20),
        exempt=assets.is_upload_path,
        render=too_large_body_for,
    )
    # Outside the body limit, so that even a 413 carries X-Request-ID and gets its log line.
    app.add_middleware(RequestContext)
    # Outermost: preflights are answered, and CORS headers added to every answer, including errors.
    install_cors(app, settings)
    return app
