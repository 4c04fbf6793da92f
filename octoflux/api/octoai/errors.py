"""OctoAI's error shapes: each domain error rendered once, in the form the octoai SDK parses.

`render` and `http_problem` are the default row of `octoflux/api/common/dialects.py`: every path
that no other dialect claims answers its errors in this shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from octoflux.core.errors import DOMAIN_ERRORS, Problem, problem, status_kind


def render(found: Problem) -> tuple[int, dict[str, str], dict]:
    """`{"detail": [{loc, msg, type}]}` for a bad field (FastAPI's own 422 shape), else `{"detail": msg}`."""
    if found.status == 422 and found.field is not None:
        detail = [{"loc": [found.location, found.field], "msg": found.message, "type": "value_error"}]
        return 422, {}, {"detail": detail}
    headers = {"Retry-After": str(found.retry_after)} if found.retry_after else {}
    return found.status, headers, {"detail": found.message}


def http_problem(method: str, path: str, exc: HTTPException) -> Problem:
    """An HTTPException (the router's 404/405, auth's 401): its detail is the message, as in FastAPI."""
    return Problem(exc.status_code, status_kind(exc.status_code), str(exc.detail))


def octoai_error(request: Request, found: Problem) -> JSONResponse:
    request.state.log["error"] = found.kind
    status, headers, body = render(found)
    return JSONResponse(status_code=status, content=body, headers=headers or None)


def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return octoai_error(request, problem(exc))


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    body_not_object = any(tuple(e.get("loc", ())) == ("body",) for e in errors)
    if body_not_object:
        content_type = request.headers.get("content-type", "")
        if not content_type.split(";")[0].strip().lower().endswith("json"):
            # FastAPI does not parse other media types as JSON: say so instead of "not an object".
            shown = content_type or "none"
            message = f"Content-Type must be application/json (got {shown})"
            return JSONResponse(status_code=415, content={"detail": message})
    # Drop "input"/"ctx": echoing a 30 MB base64 image back helps nobody.
    detail = [
        {"loc": list(err.get("loc", ())), "msg": _message(err), "type": str(err.get("type", ""))}
        for err in errors
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def _message(err: dict) -> str:
    if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "model_attributes_type":
        return "the request body must be a JSON object"
    return str(err.get("msg", ""))


def install_error_handlers(app: FastAPI) -> None:
    """OctoAI's handlers for validation and domain errors: routes outside OpenAI's speak OctoAI."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, _domain_error)
