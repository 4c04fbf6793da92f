"""Bearer-token auth against the key table (OCTOFLUX_API_KEYS and `--api-keys-file`), and scopes.

Every route that takes a key depends on `require_bearer`: a missing or unknown key is a 401, a key
without the scope the path needs a 403 in the path's dialect (asset routes need `assets`, every other
keyed route `generate`). The key found is kept on `request.state.tenant` for `deps.caller`.
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status

from octoflux.core.errors import Forbidden
from octoflux.core.tenants import ASSETS, GENERATE, METRICS, Tenant

# Path prefix -> the scope a key needs there; the first match wins, the rest need DEFAULT_SCOPE.
SCOPES_BY_PATH: tuple[tuple[str, str], ...] = (("/v1/assets", ASSETS),)
DEFAULT_SCOPE = GENERATE


def scope_for(path: str) -> str:
    for prefix, scope in SCOPES_BY_PATH:
        if path.startswith(prefix):
            return scope
    return DEFAULT_SCOPE


def presented_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def bearer_tenant(request: Request) -> Tenant | None:
    """The key the request carries, or None (no header, another scheme, or an unknown key)."""
    token = presented_token(request)
    return request.app.state.service.keys.find(token) if token else None


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid bearer token",
        headers={"WWW-Authenticate": 'Bearer realm="octoflux"'},
    )


def require_bearer(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries a known key, 403 unless it has the path's scope."""
    request.state.tenant = None
    if not request.app.state.service.keys.enabled:
        return
    tenant = bearer_tenant(request)
    if tenant is None:
        raise unauthorized()
    log = getattr(request.state, "log", None)
    if log is not None:  # the request's access-log line names the key (never its secret)
        log["key"] = tenant.name
    scope = scope_for(request.url.path)
    if not tenant.allows(scope):
        raise Forbidden(f"key {tenant.name!r} does not have the {scope!r} scope this route needs")
    request.state.tenant = tenant


def sees_operations(request: Request) -> bool:
    """Whether the request may read /metrics and the detailed probes: with no keys or
    `--public-metrics` anyone may, else a key with the `metrics` (or `admin`) scope."""
    service = request.app.state.service
    if not service.keys.enabled or service.settings.public_metrics:
        return True
    tenant = bearer_tenant(request)
    return tenant is not None and tenant.allows(METRICS)
