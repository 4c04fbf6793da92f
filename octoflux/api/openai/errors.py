"""OpenAI's error shape for the `/v1/images/*` and `/v1/models` routes.

`{"error": {"message", "type", "param", "code"}}`, with OpenAI's statuses: every bad value is a 400
(never FastAPI's 422), a bad key a 401, a full queue a 429 with `Retry-After`. The routes use
`OpenAIRoute`, which renders whatever the route raises (validation, auth, the service's domain
errors via `octoflux.core.errors.problem`) here instead of in the app-wide OctoAI handlers. `render`
and `http_problem` are this dialect's row in `octoflux/api/common/dialects.py`, for errors answered
outside the routes (404/405, 413, an unhandled 500, Ray's proxy).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from octoflux.core.errors import DOMAIN_ERRORS, Problem, problem

# The core's field a service error names (`octoflux/core/request.py`) -> the OpenAI parameter the caller sent.
PARAMS = {"num_images": "n", "init_image": "image", "mask_image": "mask", "width": "size", "height": "size"}
CODES = {
    "validation": "invalid_value",
    "queue_full": "rate_limit_exceeded",
    "unauthorized": "invalid_api_key",
}
# The kind of an HTTPException raised while serving a route, by status (FastAPI's form errors are 400s).
HTTP_KINDS = {401: "unauthorized", 413: "body_too_large"}


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"  # OpenAI's type for 400, 401 and 404 alike


def render(found: Problem) -> tuple[int, dict[str, str], dict]:
    """`{"error": {message, type, param, code}}`; a 422 is OpenAI's 400, a Retry-After goes along."""
    status = 400 if found.status == 422 else found.status
    headers = {"Retry-After": str(found.retry_after)} if found.retry_after else {}
    error = {
        "message": found.message,
        "type": error_type(status),
        "param": PARAMS.get(found.field, found.field) if found.field else None,
        "code": CODES.get(found.kind, found.kind),
    }
    return status, headers, {"error": error}


def openai_error(request: Request, found: Problem, headers: Mapping[str, str] | None = None) -> JSONResponse:
    log = getattr(request.state, "log", None)
    if log is not None:
        log["error"] = found.kind
    status, shape_headers, body = render(found)
    headers = {**(headers or {}), **shape_headers}
    return JSONResponse(status_code=status, content=body, headers=headers or None)


def validation_problem(errors: list[dict]) -> Problem:
    """The first pydantic error as OpenAI words it, naming the parameter."""
    err = errors[0] if errors else {}
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    kind = str(err.get("type", ""))
    message = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return Problem(400, "unknown_parameter", f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return Problem(400, "missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    if param is None:
        if kind == "model_attributes_type":
            message = "the request body must be a JSON object"
        return Problem(400, "invalid_request", message)
    if kind == "json_invalid":
        return Problem(400, "invalid_json", f"the body is not valid JSON: {message}")
    if message.startswith("Expected UploadFile"):  # a text part where a file part belongs
        message = "expected a file upload (a part with a filename), got a text field"
    return Problem(400, "invalid_value", f"Invalid value for '{param}': {message}", param)


def http_problem(method: str, path: str, exc: HTTPException) -> Problem:
    """An HTTPException: a path no route serves (404) or a method it lacks (405) names the request."""
    if exc.status_code in (404, 405):
        where = f"{method} {path}"
        message = f"Invalid URL ({where})" if exc.status_code == 404 else f"{exc.detail} ({where})"
        return Problem(exc.status_code, "invalid_url", message)
    return _route_http_problem(exc)


def _route_http_problem(exc: HTTPException) -> Problem:
    """An HTTPException a route raised: a 401 from auth, a 413 from the body limit, FastAPI's 400s."""
    return Problem(exc.status_code, HTTP_KINDS.get(exc.status_code, "invalid_request"), str(exc.detail))


def _is_form(request: Request) -> bool:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media_type in ("multipart/form-data", "application/x-www-form-urlencoded")


def _not_a_form(request: Request) -> Problem:
    """A JSON (or other) body sent where a form is read: every field would look missing."""
    sent = request.headers.get("content-type") or "none"
    message = f"this endpoint takes multipart/form-data (got Content-Type: {sent})"
    return Problem(400, "invalid_content_type", message)


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors, raised anywhere while serving it, come back in OpenAI's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        self._takes_form = self.body_field is not None and isinstance(self.body_field.field_info, params.Form)

        async def serve(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if self._takes_form and not _is_form(request):
                    return openai_error(request, _not_a_form(request))
                return openai_error(request, validation_problem(list(exc.errors())))
            except HTTPException as exc:
                return openai_error(request, _route_http_problem(exc), exc.headers)
            except DOMAIN_ERRORS as exc:
                return openai_error(request, problem(exc))

        return serve
