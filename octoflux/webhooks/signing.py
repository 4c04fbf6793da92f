"""Standard Webhooks signing: the secret's format and the three headers every attempt carries."""

from __future__ import annotations

import base64
import binascii
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_webhook_secret() -> str:
    """A fresh signing secret in the spec's format: whsec_ + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_webhook_secret(value: str) -> str:
    """'' (webhooks off) or whsec_ + base64 of 24 to 64 bytes; the error never repeats the value."""
    if not value:
        return value
    hint = "make one with: echo whsec_$(openssl rand -base64 32)"
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"--webhook-secret must start with {SECRET_PREFIX!r} (Standard Webhooks); {hint}")
    encoded = value[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"--webhook-secret: what follows {SECRET_PREFIX!r} is not base64; {hint}") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"--webhook-secret must decode to 24-64 bytes, not {len(key)}; {hint}")
    return value


def signature_headers(signer: Webhook, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature (v1, HMAC-SHA256 over id.timestamp.body)."""
    signature = signer.sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode("utf-8"))
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}
