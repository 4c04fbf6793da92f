"""Typed errors mapped to HTTP in one place, in the shapes the octoai SDK parses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines.engine import GenerationFailed, OutOfMemory


class ServiceUnavailable(Exception):
    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def invalid(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for one body field, in FastAPI's own `{"detail": [{loc, msg, type}]}` shape."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": kind}])


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Drop "input"/"ctx": echoing a 30 MB base64 image back helps nobody.
    detail = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse(status_code=503, content={"detail": exc.detail}, headers=headers)


def _generation_failed(request: Request, exc: GenerationFailed) -> JSONResponse:
    if isinstance(exc, OutOfMemory):
        return JSONResponse(
            status_code=503,
            content={"detail": "out of GPU memory for this request; try fewer images or a smaller size"},
        )
    return JSONResponse(status_code=500, content={"detail": f"generation failed: {exc}"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(GenerationFailed, _generation_failed)
