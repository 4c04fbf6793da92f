"""Typed errors mapped to HTTP in one place, in the shapes the octoai SDK parses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines.engine import GenerationFailed, OutOfMemory
from pipelines.loras import LoraError
from server import jobs

# Nginx's "client closed request": logged, never seen by the client that left.
CLIENT_CLOSED = 499


class ServiceUnavailable(Exception):
    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for one body field, in FastAPI's own `{"detail": [{loc, msg, type}]}` shape."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])


def job_failure(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error kind, message) for anything a queued job can end with."""
    if isinstance(exc, OutOfMemory):
        return (
            503,
            "out_of_memory",
            "out of GPU memory for this request; retry with fewer images (num_images) or a smaller size",
        )
    if isinstance(exc, LoraError):
        return 422, "invalid_lora", str(exc)
    if isinstance(exc, GenerationFailed):
        return 500, "generation_failed", f"generation failed: {exc}"
    if isinstance(exc, jobs.ShuttingDown):
        return 503, "shutting_down", f"{exc}; retry (another replica or after the restart)"
    if isinstance(exc, jobs.JobCancelled):
        if exc.reason == jobs.TIMEOUT:
            what = "interrupted" if exc.started else "dropped from the queue"
            return 504, "timeout", f"request timed out; the job was {what}"
        if exc.reason == jobs.SHUTDOWN:
            return 503, "shutting_down", "server shutting down: the job was interrupted; retry"
        if exc.reason == jobs.CLIENT_GONE:
            return CLIENT_CLOSED, "client_disconnected", "client disconnected; the job was cancelled"
        return 409, "cancelled", f"job cancelled: {exc.reason}"
    return 500, "internal", f"generation failed: {type(exc).__name__}"


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


def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(status_code=503, content={"detail": exc.detail}, headers=headers)


def _generation_failed(request: Request, exc: GenerationFailed) -> JSONResponse:
    status, kind, detail = job_failure(exc)
    request.state.log["error"] = kind
    return JSONResponse(status_code=status, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(GenerationFailed, _generation_failed)
