"""What a webhook says: the event types, the JSON body, and the message id that stays the same on retries."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

EVENT_TYPES = {
    "completed": "generation.completed",
    "failed": "generation.failed",
    "cancelled": "generation.cancelled",
}


def build_payload(
    event_type: str,
    response_id: str,
    status: str,
    response_url: str | None,
    error: str | None,
    now: datetime | None = None,
) -> bytes:
    """The exact JSON body signed and sent; no image bytes (the receiver fetches response_url)."""
    if event_type not in EVENT_TYPES.values():
        raise ValueError(f"unknown webhook event type {event_type!r}")
    when = (now or datetime.now(UTC)).astimezone(UTC)
    document = {
        "type": event_type,
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {"response_id": response_id, "status": status, "response_url": response_url, "error": error},
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def message_id(job_id: str, event_type: str) -> str:
    """One id per job and event: a second enqueue of the same event is the same message to receivers."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{event_type}".encode()).hexdigest()[:32]
