"""Plain records that outlive a request: what the state store keeps, whichever backend holds it."""

from __future__ import annotations

from dataclasses import dataclass

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
FINAL = (COMPLETED, FAILED, CANCELLED)


@dataclass
class JobRecord:
    """An async job as clients see it through the poll URL; the body is stored beside it."""

    id: str
    owner: str | None  # sha256 of the bearer token that created it; None when auth is off
    request_id: str
    created_at: float  # unix seconds
    replica: str  # the process that accepted the job, then the one holding its lease
    status: str = PENDING
    encoding: str = "png"
    error: str | None = None
    error_status: int | None = None  # the HTTP status a sync call would have answered
    finished_at: float | None = None  # unix seconds
    webhook_url: str | None = None
    result_url: str | None = None  # absolute URL of the result, which the completed webhook carries
    attempts: int = 0  # leases taken so far; each is one run of the job
    lease_until: float | None = None  # unix seconds; set while a process holds the job
    idempotency_key: str | None = None  # the client's Idempotency-Key, unique per owner
    request_hash: str | None = None  # what the key was sent with: a reuse with another body is refused


@dataclass
class LeasedJob:
    """A queued job a process took: its record and the stored request to run."""

    record: JobRecord
    request: bytes


@dataclass
class Delivery:
    """One webhook message; every attempt sends the same id and body (Standard Webhooks)."""

    id: str  # webhook-id, "msg_..."
    job_id: str
    url: str
    payload: bytes  # the exact JSON body that is signed and sent
    created_at: float  # unix seconds
    attempts: int = 0
    next_attempt_at: float = 0.0  # unix seconds
    status: str = "pending"  # pending | delivered | failed
    last_error: str | None = None
