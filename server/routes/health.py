"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process serves HTTP")
async def healthz(request: Request):
    failure = request.app.state.load_error
    if failure is not None:
        return JSONResponse(status_code=500, content={"status": "failed", "detail": failure})
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once the pipeline is loaded and warmed")
async def readyz(request: Request):
    state = request.app.state
    if not state.ready.is_set():
        detail = state.load_error or "loading model"
        return JSONResponse(status_code=503, content={"status": "not ready", "detail": detail})
    return {"status": "ready", "model": state.settings.model, "queue_depth": state.jobs.depth}
