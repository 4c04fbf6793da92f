"""Bearer-token auth against OCTOFLUX_API_KEYS, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status


def token_is_valid(presented: str, accepted: list[str]) -> bool:
    # Compare against every key so the time taken does not reveal which one nearly matched.
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched


def require_bearer(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries an accepted bearer token."""
    accepted: list[str] = request.app.state.service.settings.api_key_list
    if not accepted:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_is_valid(token.strip(), accepted):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="octoflux"'},
        )
