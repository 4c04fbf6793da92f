"""CORS for browser apps on other origins: only the origins named in `--cors-origins`."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server.settings import Settings

ALLOWED_METHODS = ["GET", "POST", "PUT", "DELETE"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-OctoAI-Async", "X-Request-ID"]
# Without these a browser script cannot read how long to wait or which request failed.
EXPOSED_HEADERS = ["Retry-After", "X-Request-ID"]


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Answer preflights and tag responses for the configured origins; nothing when none are set.

    Call it after every other middleware, so that it is the outermost one and error responses
    from the others (a 413, a 401) carry the CORS headers a browser needs to read them.
    """
    origins = settings.cors_origin_list
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=ALLOWED_METHODS,
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
