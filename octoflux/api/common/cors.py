"""CORS for browser apps on other origins: only the origins named in `--cors-origins`."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from octoflux.settings import Settings

ALLOWED_METHODS = ["GET", "POST", "PUT", "DELETE"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-OctoAI-Async", "X-Request-ID"]
# Without these a browser script cannot read how long to wait or which request failed.
EXPOSED_HEADERS = ["Retry-After", "X-Request-ID"]


class AllowedOriginsOnly(CORSMiddleware):
    """Starlette's CORS, except that another origin gets no CORS headers at all.

    Starlette answers its preflight with a 400 that still lists the allowed methods and headers,
    and its other requests with `Access-Control-Expose-Headers`; a foreign origin is told nothing.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        if not self.is_allowed_origin(request_headers["origin"]):
            return PlainTextResponse("Disallowed CORS origin", status_code=400)
        return super().preflight_response(request_headers)

    async def simple_response(
        self, scope: Scope, receive: Receive, send: Send, request_headers: Headers
    ) -> None:
        origin = request_headers.get("origin")
        if origin is None or not self.is_allowed_origin(origin):
            await self.app(scope, receive, send)
            return
        await super().simple_response(scope, receive, send, request_headers)


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Answer preflights and tag responses for the configured origins; nothing when none are set.

    Call it after every other middleware, so that it is the outermost one and error responses
    from the others (a 413, a 401) carry the CORS headers a browser needs to read them.
    """
    origins = settings.cors_origin_list
    if not origins:
        return
    app.add_middleware(
        AllowedOriginsOnly,
        allow_origins=origins,
        allow_methods=ALLOWED_METHODS,
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
