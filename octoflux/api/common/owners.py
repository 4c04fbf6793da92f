"""Who owns an async job: a hash of the bearer token that created it, never the token."""

from __future__ import annotations

import hashlib


def owner_key(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None
