"""Per-key quotas at admission: `max_queued` (jobs waiting or running) and `images_per_minute`.

Counted in this process (each replica counts its own). A request past either limit is refused with
a `QuotaExceeded` (429) whose Retry-After is computed for that key: when its oldest job should end
(from how long its jobs took here), or when enough images leave its one-minute window. Other keys
are unaffected. A held slot is released when the job's future settles, or when the job is dropped.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from octoflux.core.errors import InvalidField, ServiceError
from octoflux.core.metrics import KEY_IMAGES, KEY_JOBS, KEY_REFUSED
from octoflux.core.request import Caller
from octoflux.core.tenants import Tenant

if TYPE_CHECKING:
    from octoflux.core.queue import Job

WINDOW_S = 60.0
MAX_RETRY_AFTER = 60
# Until one of the key's jobs has finished here, assume a job takes this long.
DEFAULT_JOB_S = 5.0


class QuotaExceeded(ServiceError):
    status, kind = 429, "quota_exceeded"


class Quota:
    """One key's limits and what it uses now, shared by every request of that key in this process."""

    def __init__(self, tenant: Tenant):
        self.tenant = tenant
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}  # ticket -> when admitted, for jobs not yet ended
        self._images: deque[tuple[float, int]] = deque()  # (when, images) in the last minute
        self._job_seconds: float | None = None
        self._tickets = 0

    def admit(self, images: int) -> Callable[[], None]:
        """Count a job of `images` images, or raise `QuotaExceeded`; returns its release (idempotent)."""
        tenant, now = self.tenant, time.monotonic()
        if tenant.images_per_minute is not None and images > tenant.images_per_minute:
            raise InvalidField(
                "num_images",
                f"{images} images in one request exceed this key's images_per_minute "
                f"({tenant.images_per_minute})",
            )
        with self._lock:
            self._forget_before(now - WINDOW_S)
            self._check_queued(now)
            self._check_rate(now, images)
            self._tickets += 1
            ticket = self._tickets
            self._started[ticket] = now
            self._images.append((now, images))
            KEY_JOBS.labels(tenant.name).set(len(self._started))
        KEY_IMAGES.labels(tenant.name).inc(images)
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._end(ticket)

        return release

    def _check_queued(self, now: float) -> None:
        limit = self.tenant.max_queued
        if limit is None or len(self._started) < limit:
            return
        oldest = min(self._started.values())
        expected = self._job_seconds if self._job_seconds is not None else DEFAULT_JOB_S
        self._refuse(
            "max_queued",
            f"{len(self._started)} jobs queued or running (max_queued {limit})",
            oldest + expected - now,
        )

    def _check_rate(self, now: float, images: int) -> None:
        limit = self.tenant.images_per_minute
        if limit is None:
            return
        used = sum(n for _, n in self._images)
        if used + images <= limit:
            return
        # The wait until enough of the oldest images leave the window for this request to fit.
        freed, wait = 0, WINDOW_S
        for when, n in self._images:
            freed += n
            if used - freed + images <= limit:
                wait = when + WINDOW_S - now
                break
        self._refuse(
            "images_per_minute", f"{used} images in the last minute (images_per_minute {limit})", wait
        )

    def _refuse(self, limit: str, what: str, wait_s: float) -> None:
        retry_after = min(MAX_RETRY_AFTER, max(1, math.ceil(wait_s)))
        KEY_REFUSED.labels(self.tenant.name, limit).inc()
        message = f"key {self.tenant.name!r} has {what}; retry in {retry_after}s"
        raise QuotaExceeded(message, retry_after=retry_after)

    def _forget_before(self, cutoff: float) -> None:
        while self._images and self._images[0][0] <= cutoff:
            self._images.popleft()

    def _end(self, ticket: int) -> None:
        with self._lock:
            started = self._started.pop(ticket, None)
            if started is not None:
                took = time.monotonic() - started
                # A moving average, so one slow job does not set every later Retry-After.
                self._job_seconds = (
                    took if self._job_seconds is None else 0.7 * self._job_seconds + 0.3 * took
                )
            KEY_JOBS.labels(self.tenant.name).set(len(self._started))


class Quotas:
    """Every key's `Quota` in this process, by key name; a reloaded key keeps its counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Quota] = {}

    def of(self, tenant: Tenant) -> Quota:
        with self._lock:
            quota = self._by_name.get(tenant.name)
            if quota is None:
                quota = self._by_name[tenant.name] = Quota(tenant)
            quota.tenant = tenant  # limits as the keys file says now
            return quota


def admitted(caller: Caller, spec, make_job: Callable[[], Job]) -> Job:
    """`make_job()` admitted under the caller's key, or `QuotaExceeded` before it is made; the slot is
    released when the job's future settles, or when the job object is dropped (a job that never ran)."""
    if caller.quota is None:
        return make_job()
    release = caller.quota.admit(len(spec.seeds))
    try:
        job = make_job()
    except BaseException:
        release()
        raise
    job.future.add_done_callback(lambda _future: release())
    weakref.finalize(job, release)
    return job
