"""Who owns what a request creates: the key it authenticated with, never the token."""

from __future__ import annotations

from fastapi import Request

from octoflux.core.tenants import Tenant


def request_tenant(request: Request) -> Tenant | None:
    """The key `require_bearer` accepted; None when the server has no keys."""
    return getattr(request.state, "tenant", None)


def request_owner(request: Request) -> str | None:
    """Who may read an async result: the key's owner id (sha256 of its secret), else anyone."""
    tenant = request_tenant(request)
    return tenant.owner if tenant is not None else None


def asset_space(request: Request) -> str | None:
    """Whose assets the request sees first and creates: the key's own, or the shared ones (None) for
    an admin key or a server without keys."""
    tenant = request_tenant(request)
    return tenant.asset_space if tenant is not None else None
