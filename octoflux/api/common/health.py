"""Liveness and readiness probes, and Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from octoflux.api.common.deps import Service
from octoflux.core import metrics

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process serves HTTP")
async def healthz(service: Service):
    # Liveness only: a failed model load is a readiness problem (/readyz says why), and
    # restarting the process would not fix a wrong --model.
    # replica and pid: which process answered (with several replicas, the tests kill one by pid).
    return {
        "status": "ok",
        "ready": service.ready,
        "load_error": service.load_error,
        "replica": service.replica,
        "pid": os.getpid(),
    }


@router.get("/readyz", summary="Readiness: 200 once the pipeline is loaded and warmed, 503 while draining")
async def readyz(service: Service):
    readiness = service.readiness()
    if not readiness.ready:
        status = "shutting down" if readiness.status == "shutting down" else "not ready"
        return JSONResponse(status_code=503, content={"status": status, "detail": readiness.detail})
    return {
        "status": "ready",
        "model": service.settings.model,
        "queue_depth": service.jobs.depth,
        "in_flight": service.jobs.in_flight,
    }


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics: queue, latency, images, step time, errors, LoRA cache",
)
async def prometheus_metrics(service: Service):
    metrics.QUEUE_DEPTH.set(service.jobs.depth)
    metrics.JOBS_IN_FLIGHT.set(service.jobs.in_flight)
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
