"""Liveness and readiness probes, and Prometheus metrics.

With keys set, /metrics and the probes' details (pid, replica, load error, model, queue) are for keys
with the `metrics` or `admin` scope (Prometheus scrapes with a bearer token) unless
`--public-metrics`; anyone else gets the probes' status alone, and a 401/403 from /metrics.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from octoflux.api.common.auth import bearer_tenant, sees_operations, unauthorized
from octoflux.api.common.deps import Service
from octoflux.core import metrics
from octoflux.core.errors import Forbidden

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process serves HTTP")
async def healthz(request: Request, service: Service):
    # Liveness only: a failed model load is a readiness problem (/readyz says why), and
    # restarting the process would not fix a wrong --model.
    # replica and pid: which process answered (with several replicas, the tests kill one by pid).
    if not sees_operations(request):
        return {"status": "ok"}
    return {
        "status": "ok",
        "ready": service.ready,
        "load_error": service.load_error,
        "replica": service.replica,
        "pid": os.getpid(),
    }


@router.get("/readyz", summary="Readiness: 200 once the pipeline is loaded and warmed, 503 while draining")
async def readyz(request: Request, service: Service):
    readiness = service.readiness()
    details = sees_operations(request)
    if not readiness.ready:
        status = "shutting down" if readiness.status == "shutting down" else "not ready"
        content = {"status": status, "detail": readiness.detail} if details else {"status": status}
        return JSONResponse(status_code=503, content=content)
    if not details:
        return {"status": "ready"}
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
async def prometheus_metrics(request: Request, service: Service):
    if not sees_operations(request):
        tenant = bearer_tenant(request)
        if tenant is None:
            raise unauthorized()
        raise Forbidden(f"key {tenant.name!r} does not have the 'metrics' scope /metrics needs")
    metrics.QUEUE_DEPTH.set(service.jobs.depth)
    metrics.JOBS_IN_FLIGHT.set(service.jobs.in_flight)
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
