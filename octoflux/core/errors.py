"""Domain errors, and the one table that gives each its status, kind and message.

The service raises these (no HTTP in them); each API dialect renders a `Problem` in its own shape:
OctoAI's routes in `octoflux/api/octoai/errors.py`, OpenAI's in their adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from octoflux.pipelines.engine import GenerationFailed, OutOfMemory
from octoflux.pipelines.loras import LoraError

# Nginx's "client closed request": logged, never seen by the client that left.
CLIENT_CLOSED = 499

# Why a job was cancelled; each reason has its own status.
CLIENT_GONE = "client disconnected"
TIMEOUT = "request timeout"
SHUTDOWN = "server shutting down"
DELETED = "cancelled by the client"
WORKER_LOST = "the worker running the job was lost"


class ServiceError(Exception):
    """A request the service cannot serve; `status` and `kind` say how, the message says why."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidField(ServiceError):
    """A request field that cannot be used; the message says why in words.

    `location` is where the field was sent: "body" (a JSON field) or "header" (an HTTP header).
    """

    status, kind = 422, "validation"

    def __init__(self, field: str, message: str, location: str = "body"):
        super().__init__(message)
        self.field = field
        self.location = location


class NotReady(ServiceError):
    status, kind = 503, "not_ready"


class ShuttingDown(ServiceError):
    status, kind = 503, "shutting_down"

    def __init__(self, message: str = "server is shutting down; retry"):
        super().__init__(message)


class QueueFull(ServiceError):
    status, kind = 429, "queue_full"

    def __init__(self, retry_after: int, depth: int | None = None):
        queued = f"{depth} jobs queued; " if depth is not None else ""
        super().__init__(f"server busy: {queued}retry in {retry_after}s", retry_after=retry_after)


class NotFound(ServiceError):
    status, kind = 404, "not_found"


class Conflict(ServiceError):
    status, kind = 409, "conflict"


class Forbidden(ServiceError):
    status, kind = 403, "forbidden"


class TooLarge(ServiceError):
    status, kind = 413, "body_too_large"


class WorkerLost(ServiceError):
    status, kind = 503, "worker_lost"


class JobCancelled(Exception):
    """The job was cancelled before it finished; `reason` says by whom."""

    def __init__(self, reason: str, started: bool):
        super().__init__(reason)
        self.reason = reason
        self.started = started


@dataclass(frozen=True)
class Problem:
    status: int
    kind: str
    message: str
    field: str | None = None
    retry_after: int | None = None
    location: str = "body"


def problem(exc: BaseException) -> Problem:
    """The status, kind and message for anything a request or its job can end with."""
    if isinstance(exc, InvalidField):
        return Problem(exc.status, exc.kind, exc.message, field=exc.field, location=exc.location)
    if isinstance(exc, ServiceError):
        return Problem(exc.status, exc.kind, exc.message, retry_after=exc.retry_after)
    if isinstance(exc, OutOfMemory):
        message = "out of GPU memory for this request; retry with fewer images (num_images) or a smaller size"
        return Problem(503, "out_of_memory", message)
    if isinstance(exc, LoraError):
        message = str(exc) if repr(exc.name) in str(exc) else f"LoRA {exc.name!r}: {exc}"
        return Problem(422, "invalid_lora", message, field="loras")
    if isinstance(exc, GenerationFailed):
        return Problem(500, "generation_failed", f"generation failed: {exc}")
    if isinstance(exc, JobCancelled):
        return _cancelled(exc)
    return Problem(500, "internal", f"generation failed: {type(exc).__name__}")


def _cancelled(exc: JobCancelled) -> Problem:
    if exc.reason == TIMEOUT:
        what = "interrupted" if exc.started else "dropped from the queue"
        return Problem(504, "timeout", f"request timed out; the job was {what}")
    if exc.reason == SHUTDOWN:
        if exc.started:
            return Problem(503, "shutting_down", "server shutting down: the job was interrupted; retry")
        message = "server shut down before the job started; retry (another replica or after the restart)"
        return Problem(503, "shutting_down", message)
    if exc.reason == CLIENT_GONE:
        return Problem(CLIENT_CLOSED, "client_disconnected", "client disconnected; the job was cancelled")
    return Problem(409, "cancelled", f"job cancelled: {exc.reason}")
