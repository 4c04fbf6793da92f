"""`GET /v1/whoami`: which key a request carries, its scopes and limits (the playground shows them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from octoflux.api.common.auth import bearer_tenant, unauthorized
from octoflux.api.common.deps import Service
from octoflux.core.tenants import SCOPES

router = APIRouter()


@router.get(
    "/v1/whoami",
    summary="The API key in use: its name, scopes and limits (any key may ask; never the secret)",
)
async def whoami(request: Request, service: Service):
    if not service.keys.enabled:
        open_access = {"name": None, "scopes": list(SCOPES), "max_queued": None, "images_per_minute": None}
        return {"auth": False, **open_access}
    tenant = bearer_tenant(request)
    if tenant is None:
        raise unauthorized()
    return {"auth": True, **tenant.view()}
