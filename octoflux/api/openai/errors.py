"""OpenAI's error shape for the `/v1/images/*` and `/v1/models` routes.

`{"error": {"message", "type", "param", "code"}}`, with OpenAI's statuses: every bad value is a 400
(never FastAPI's 422), a bad key a 401, a full queue a 429 with `Retry-After`. The routes use
`OpenAIRoute`, which renders whatever the route raises (validation, auth, the service's domain
errors via `octoflux.core.errors.problem`) here instead of in the app-wide OctoAI handlers.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import HTTPException, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from octoflux.api.common.body_limit import BodyTooLarge
from octoflux.core.errors import JobCancelled, Problem, ServiceError, problem
from octoflux.pipelines.engine import GenerationFailed
from octoflux.pipelines.loras import LoraError

# The OctoAI field a service error names -> the OpenAI parameter the caller sent.
PARAMS = {
    "num_images": "n",
    "init_image": "image",
    "mask_image": "mask",
    "cfg_scale": "guidance",
    "width": "size",
    "height": "size",
}
CODES = {
    "validation": "invalid_value",
    "queue_full": "rate_limit_exceeded",
    "unauthorized": "invalid_api_key",
}


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"  # OpenAI's type for 400, 401 and 404 alike


def openai_error(request: Request, found: Problem, headers: Mapping[str, str] | None = None) -> JSONResponse:
    log = getattr(request.state, "log", None)
    if log is not None:
        log["error"] = found.kind
    status = 400 if found.status == 422 else found.status
    headers = dict(headers or {})
    if found.retry_after:
        headers["Retry-After"] = str(found.retry_after)
    return JSONResponse(status_code=status, content=error_body(found), headers=headers or None)


def error_body(found: Problem) -> dict:
    status = 400 if found.status == 422 else found.status
    return {
        "error": {
            "message": found.message,
            "type": error_type(status),
            "param": PARAMS.get(found.field, found.field) if found.field else None,
            "code": CODES.get(found.kind, found.kind),
        }
    }


def too_large_body(message: str) -> dict:
    """A 413 refused by the body limit before the route ran."""
    return error_body(Problem(413, "body_too_large", message))


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


def unrouted_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A path under the OpenAI prefixes that no route serves (404), or a method it lacks (405)."""
    where = f"{request.method} {request.url.path}"
    message = f"Invalid URL ({where})" if exc.status_code == 404 else f"{exc.detail} ({where})"
    return openai_error(request, Problem(exc.status_code, "invalid_url", message), exc.headers)


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
            except BodyTooLarge as exc:
                return openai_error(request, Problem(413, "body_too_large", str(exc.detail)))
            except (HTTPException, StarletteHTTPException) as exc:
                kind = "unauthorized" if exc.status_code == 401 else "invalid_request"
                return openai_error(request, Problem(exc.status_code, kind, str(exc.detail)), exc.headers)
            except (ServiceError, GenerationFailed, LoraError, JobCancelled) as exc:
                return openai_error(request, problem(exc))

        return serve
