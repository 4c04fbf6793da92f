"""Domain errors, and the one table that gives each its status, kind and message.

The service raises these (no HTTP in them); each API dialect renders a `Problem` in its own shape
(`octoflux/api/<dialect>/errors.py`), and `octoflux/api/common/dialects.py` says which dialect a path
speaks. Importing this module loads no torch: Ray's HTTP proxy renders errors with it too.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from octoflux.pipelines.errors import GenerationFailed, LoraError, OutOfMemory, PipelineError
from octoflux.state.store import StateStoreError

log = logging.getLogger(__name__)
# A client's wait before retrying while the state store (SQLite file, Redis) is failing.
STATE_RETRY_AFTER_S = 5
# While the store fails, clients polling in a loop would log a line each: one line per this many seconds.
STORE_FAILURE_LOG_EVERY_S = 30.0


class _ThrottledLog:
    """The first store failure logged at once, later ones at most every STORE_FAILURE_LOG_EVERY_S, counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -math.inf
        self._skipped = 0

    def note(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < STORE_FAILURE_LOG_EVERY_S:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        more = f" ({skipped} more since the last line)" if skipped else ""
        log.warning("a request failed on the state store: %s%s", message, more)


_store_failures = _ThrottledLog()

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


class JobCancelled(Exception):
    """The job was cancelled before it finished; `reason` says by whom."""

    def __init__(self, reason: str, started: bool):
        super().__init__(reason)
        self.reason = reason
        self.started = started


# The kind of an error known by its HTTP status alone (the router's 404, auth's 401, a bare 500).
STATUS_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "queue_full",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}
# Everything `problem()` gives a status of its own: what the HTTP side catches and renders.
DOMAIN_ERRORS = (ServiceError, PipelineError, JobCancelled, StateStoreError)


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
    if isinstance(exc, StateStoreError):
        # The store's own words (a file path, a Redis host) are for the log, not the client.
        _store_failures.note(str(exc))
        return Problem(
            503, "state_unavailable", "the state store is failing; retry", retry_after=STATE_RETRY_AFTER_S
        )
    return Problem(500, "internal", f"generation failed: {type(exc).__name__}")


def status_kind(status: int) -> str:
    return STATUS_KINDS.get(status, f"http_{status}")


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
