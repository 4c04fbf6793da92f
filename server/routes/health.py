"""Liveness and readiness probes, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from server import metrics

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process serves HTTP")
async def healthz(request: Request):
    # Liveness only: a failed model load is a readiness problem (/readyz says why), and
    # restarting the process would not fix a wrong --model.
    state = request.app.state
    return {"status": "ok", "ready": state.ready.is_set(), "load_error": state.load_error}


@router.get("/readyz", summary="Readiness: 200 once the pipeline is loaded and warmed, 503 while draining")
async def readyz(request: Request):
    state = request.app.state
    if state.draining.is_set():
        return JSONResponse(status_code=503, content={"status": "shutting down", "detail": "draining"})
    if not state.ready.is_set():
        detail = state.load_error or "loading model"
        return JSONResponse(status_code=503, content={"status": "not ready", "detail": detail})
    jobs = state.jobs
    return {
        "status": "ready",
        "model": state.settings.model,
        "queue_depth": jobs.depth,
        "in_flight": jobs.in_flight,
    }


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics: queue, latency, images, step time, errors, LoRA cache",
)
async def prometheus_metrics(request: Request):
    jobs = request.app.state.jobs
    metrics.QUEUE_DEPTH.set(jobs.depth)
    metrics.JOBS_IN_FLIGHT.set(jobs.in_flight)
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
