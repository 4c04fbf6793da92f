"""The one table of which API dialect a path speaks, and so in which shape its errors are written.

A dialect lives in its own folder (`octoflux/api/<dialect>/errors.py`) and gives two functions:
`render(Problem) -> (status, headers, body)` and `http_problem(method, path, HTTPException)`, the
words for an error known only by its status (the router's 404/405). Everything answered outside a
dialect's own routes looks its shape up here: the router's 404/405, the body limit's 413, the request
log's unhandled 500 and the errors Ray's proxy writes itself. A new dialect is a new folder and a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from octoflux.api.octoai import errors as octoai
from octoflux.api.openai import errors as openai
from octoflux.core.errors import Problem


@dataclass(frozen=True)
class Dialect:
    render: Callable[[Problem], tuple[int, dict[str, str], dict]]
    http_problem: Callable[[str, str, HTTPException], Problem]


OCTOAI = Dialect(octoai.render, octoai.http_problem)
OPENAI = Dialect(openai.render, openai.http_problem)

# Path prefix -> the dialect of every answer under it; the first match wins, the rest speak DEFAULT.
TABLE: tuple[tuple[str, Dialect], ...] = (
    ("/v1/images/", OPENAI),
    ("/v1/models", OPENAI),
)
DEFAULT = OCTOAI


def dialect_for(path: str) -> Dialect:
    for prefix, dialect in TABLE:
        if path.startswith(prefix):
            return dialect
    return DEFAULT


def error_response(request: Request, found: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """`found` in the shape of the request's dialect; the request's log line names its kind."""
    request.state.log["error"] = found.kind
    status, shape_headers, body = dialect_for(request.url.path).render(found)
    headers = {**(headers or {}), **shape_headers}
    return JSONResponse(status_code=status, content=body, headers=headers or None)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """App-wide handler for HTTPExceptions no dialect's route caught: the router's 404s and 405s."""
    found = dialect_for(request.url.path).http_problem(request.method, request.url.path, exc)
    return error_response(request, found, exc.headers)


async def send_error(send, path: str, found: Problem) -> None:
    """`found` sent as a whole raw ASGI response, for middleware that answers before or without the app."""
    status, headers, body = dialect_for(path).render(found)
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
