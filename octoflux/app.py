"""`create_app(settings)`: the FastAPI app around one `GenerationService`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from octoflux.api.common import dialects, health, keys, playground
from octoflux.api.common.body_limit import BodySizeLimit
from octoflux.api.common.cors import install_cors
from octoflux.api.common.request_log import RequestContext
from octoflux.api.octoai import assets, events
from octoflux.api.octoai import routes as octoai
from octoflux.api.octoai.errors import install_error_handlers
from octoflux.api.openai import routes as openai
from octoflux.core.codec import configure_pillow
from octoflux.core.engine_factory import EngineFactory, build_engine, build_models
from octoflux.core.service import GenerationService
from octoflux.settings import Settings

__all__ = ["build_engine", "build_models", "create_app"]


def create_app(
    settings: Settings,
    engine_factory: EngineFactory = build_models,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; the model loads in the background once it starts (`/readyz` says when it is ready).

    `on_load_failure(message)` is called if the model cannot load (the CLI exits non-zero then).
    """
    configure_pillow(settings.max_image_pixels)
    service = GenerationService(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start(on_load_failure)
        yield
        # Under `octoflux serve` SIGTERM has drained already; this covers any other way of stopping.
        await service.close()

    app = FastAPI(title="octoflux", summary="OctoAI-compatible FLUX.1-dev server", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    # The router's 404s and 405s, in the error shape of the API the path belongs to.
    app.add_exception_handler(HTTPException, dialects.http_error)
    app.include_router(health.router)
    app.include_router(keys.router)
    app.include_router(octoai.router)
    app.include_router(events.router)
    app.include_router(assets.router)
    app.include_router(openai.router)
    app.include_router(playground.router)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=int(settings.max_body_mb * 2**20),
        exempt=assets.is_upload_path,
    )
    # Outside the body limit, so that even a 413 carries X-Request-ID and gets its log line.
    app.add_middleware(RequestContext)
    # Outermost: preflights are answered, and CORS headers added to every answer, including errors.
    install_cors(app, settings)
    return app
