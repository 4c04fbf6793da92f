"""Async jobs, their whole life: accept, run, finish, poll, result, cancel, announce, expire.

Accepting stores the job whole (the validated request, seeds fixed, images included, and which
dialect renders its body) in the state store before the 202; from then on the store is the queue.
`JobRunner` (octoflux/core/job_runner.py) leases jobs from it, one at a time when this process's
worker has room, and a lease that lapses (a killed process, a lost replica) puts the job back, up to
`--max-attempts` runs. The store also holds what any replica must answer (status, error, owner, the
finished body, the result URL a webhook carries); this object adds the live `Job` handles of the jobs
this process runs, so a cancel reaches the worker at once, and a cancel that arrived through another
replica is picked up by `cancel_flagged`. Store calls block briefly (SQLite on local disk, a Redis
round trip): every `async def` here runs them off the event loop.

Whoever makes a job final in the store (the worker that ran it, a DELETE on any replica, the process
that finds its last lease lapsed) announces it once: that is where webhooks are sent from. Results are
written once (the first final write wins), so a re-run never sends a second `completed` webhook.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from octoflux.core import metrics
from octoflux.core.errors import DELETED, WORKER_LOST, Conflict, InvalidField, NotFound, QueueFull
from octoflux.core.job_runner import JobRunner
from octoflux.core.progress import ProgressEvent, StepPublisher, Watched, final_event, watch_job
from octoflux.core.queue import Job, JobQueue, new_job
from octoflux.core.quotas import admitted
from octoflux.core.request import Caller
from octoflux.core.runtime import Runtime
from octoflux.core.stored_request import StoredRequest
from octoflux.core.stored_results import read_back, read_stored_body
from octoflux.pipelines.engine import GenerationSpec
from octoflux.state.records import CANCELLED, COMPLETED, FAILED, FINAL, JobRecord
from octoflux.state.store import StateStore, StateStoreError
from octoflux.webhooks.dispatcher import WebhookDispatcher
from octoflux.webhooks.message import EVENT_TYPES
from octoflux.webhooks.urls import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)

# How often a replica reports itself and looks for lapsed leases; LEASE_S is how long a report counts.
REPLICA_HEARTBEAT_S = 2.0
LEASE_S = 10.0
SWEEP_EVERY_S = 60.0
DEFAULT_MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class Idempotency:
    """A client's `Idempotency-Key` and a digest of the request it came with."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class AsyncView:
    """An async job as its owner sees it."""

    response_id: str
    status: str
    created_at: float
    error: str | None = None


class AsyncJobs:
    def __init__(
        self,
        store: StateStore,
        replica: str,
        ttl_s: float,
        *,
        runtime: Runtime | None = None,
        jobs: JobQueue | None = None,
        webhooks: WebhookDispatcher | None = None,
        webhook_allow_private: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        lease_s: float = LEASE_S,
    ):
        self.store = store
        self.replica = replica
        self.ttl_s = ttl_s
        self.runtime = runtime
        self.jobs = jobs
        self.webhooks = webhooks
        self.webhook_allow_private = webhook_allow_private
        self.max_attempts = max_attempts
        self._live: dict[str, Job] = {}
        # Quota slots (octoflux/core/quotas.py) of jobs accepted here, held until seen final.
        self._admitted: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.runner = JobRunner(self, lease_s=lease_s)

    # ------------------------------------------------------------------ accepting

    async def check_webhook(self, url: str, field: str, location: str = "header") -> str:
        """The URL to store, after the submit-time checks (DNS, off the event loop); `InvalidField`
        naming `field` as the dialect calls it."""
        if self.webhooks is None:
            message = "this server has no webhook secret (--webhook-secret), so it cannot send webhooks"
        else:
            try:
                return await asyncio.to_thread(check_webhook_url, url, self.webhook_allow_private)
            except WebhookUrlError as exc:
                message = str(exc)
        raise InvalidField(field, message, location=location)

    async def start(
        self,
        spec: GenerationSpec,
        caller: Caller,
        dialect: str,
        options: dict | None = None,
        *,
        webhook_url: str | None = None,
        result_url: Callable[[str], str] | None = None,
        idempotency: Idempotency | None = None,
    ) -> JobRecord:
        """Store the job whole, queued, and return its record; a process with room leases it.

        `dialect` and `options` name the renderer of the finished body (octoflux/core/renderers.py).
        `result_url(job_id)` is the absolute URL a completed job's webhook carries, stored with the
        job so whichever replica makes it final can announce it. With `idempotency`, a job of the same
        owner stored under that key (and not expired) is returned instead of a new one; `Conflict` if
        it came with another request. A dialect answers a retry with `held` first, before it checks
        anything else.
        """
        self.runtime.check_accepting()
        await asyncio.to_thread(self.check_room)
        token = admitted(
            caller,
            spec,
            lambda: new_job(
                spec, api=caller.api, request_id=caller.request_id, timeout=None, owner=caller.owner
            ),
        )
        request = await asyncio.to_thread(StoredRequest(spec, dialect, options or {}).to_bytes)
        record = JobRecord(
            id=token.id,
            owner=caller.owner,
            request_id=caller.request_id,
            created_at=time.time(),
            replica=self.replica,
            webhook_url=webhook_url,
            result_url=result_url(token.id) if result_url is not None else None,
            idempotency_key=idempotency.key if idempotency else None,
            request_hash=idempotency.request_hash if idempotency else None,
        )
        try:
            stored = await asyncio.to_thread(self.store.enqueue_job, record, request, self.ttl_s)
        except BaseException:
            token.future.cancel()
            raise
        caller.trace.job_id = stored.id
        if stored.id != record.id:  # the key's job, stored since the lookup above
            token.future.cancel()
            return _same_request(stored, record.request_hash)
        with self._lock:
            self._admitted[record.id] = token
        self.runner.wake()
        return stored

    async def held(self, caller: Caller, idempotency: Idempotency) -> JobRecord | None:
        """The job `idempotency`'s key already holds for this caller (None: a new request); `Conflict`
        when it was stored for another request. Looked up before the request is decoded or admitted: a
        retry gets its job even when the queue or the key's quota is full of that very job, or a LoRA
        it names was deleted since."""
        lookup = self.store.idempotent_job
        held = await asyncio.to_thread(lookup, caller.owner, idempotency.key, self.ttl_s)
        if held is None:
            return None
        caller.trace.job_id = held.id
        return _same_request(held, idempotency.request_hash)

    def check_room(self) -> None:
        """`QueueFull` when --max-queue jobs already wait in the store's queue."""
        queued = self.store.queued_count()
        if queued >= self.jobs.max_queue:
            raise QueueFull(self.jobs.retry_after_seconds(), depth=queued)

    def adopt(self, job: Job) -> None:
        """A leased job about to run here: cancels reach it, its start and steps reach the store."""
        with self._lock:
            self._live[job.id] = job
        job.start_listeners.append(lambda started: self.store.mark_running(started.id))
        job.step_listeners.append(StepPublisher(self.store, job.id))

    def create(
        self, job: Job, *, owner: str | None, webhook_url: str | None = None, result_url: str | None = None
    ) -> JobRecord:
        """Store a job this process runs itself, outside the queue (tests, tools)."""
        record = JobRecord(
            id=job.id,
            owner=owner,
            request_id=job.request_id,
            created_at=time.time(),
            replica=self.replica,
            webhook_url=webhook_url,
            result_url=result_url,
        )
        self.store.create_job(record)
        self.adopt(job)
        return record

    # ------------------------------------------------------------------ what owners see

    async def find(self, response_id: str, owner: str | None) -> JobRecord:
        record = await asyncio.to_thread(read_back, response_id, self.get, response_id, owner)
        if record is None:
            raise NotFound(f"no async job {response_id!r}: unknown, expired, or created with another token")
        return record

    async def poll(self, response_id: str, owner: str | None) -> AsyncView:
        record = await self.find(response_id, owner)
        return AsyncView(record.id, record.status, record.created_at, record.error)

    async def result(self, response_id: str, owner: str | None) -> bytes:
        """The body a synchronous call would have returned; `Conflict` until completed."""
        record = await self.find(response_id, owner)
        if record.status != COMPLETED:
            raise Conflict(f"job is {record.status}: {record.error or 'no result yet'}")
        body = await asyncio.to_thread(read_stored_body, self.store, record.id)
        if body is None:
            raise NotFound(f"no async job {response_id!r}: its result expired")
        return body

    async def cancel_by_owner(self, response_id: str, owner: str | None) -> AsyncView:
        record = await self.find(response_id, owner)
        if record.status in FINAL or not await asyncio.to_thread(self.cancel, record):
            current = await self.find(response_id, owner)
            raise Conflict(f"job already {current.status}")
        return AsyncView(record.id, CANCELLED, record.created_at, f"job cancelled: {DELETED}")

    async def events(
        self,
        response_id: str,
        owner: str | None,
        *,
        response_url: str,
        after: int = 0,
        previews: bool = False,
    ) -> AsyncIterator[Watched]:
        """The job's live events (`NotFound` at once if the owner may not see it); see `watch_job`."""
        record = await self.find(response_id, owner)

        def final(record: JobRecord) -> ProgressEvent:
            return final_event(record.status, response_url, record.error)

        return watch_job(self.store, record, final, after=after, previews=previews)

    # ------------------------------------------------------------------ the store's side

    def get(self, job_id: str, owner: str | None) -> JobRecord | None:
        """The record, if it exists, has not expired, and belongs to `owner`."""
        record = self.store.get_job(job_id)
        if record is None or record.owner != owner or self._expired(record):
            return None
        return record

    def _expired(self, record: JobRecord) -> bool:
        return record.finished_at is not None and time.time() - record.finished_at >= self.ttl_s

    def complete(self, job_id: str, body: bytes) -> bool:
        self._forget(job_id)
        return self._finished(job_id, COMPLETED, None, self.store.finish_job(job_id, COMPLETED, body=body))

    def fail(
        self, job_id: str, status: str, message: str, http_status: int, *, announce: bool = True
    ) -> bool:
        self._forget(job_id)
        finished = self.store.finish_job(job_id, status, error=message, error_status=http_status)
        return self._finished(job_id, status, message, finished and announce)

    def cancel(self, record: JobRecord) -> bool:
        """Cancelled for the client at once; the replica that holds the job stops it."""
        error = f"job cancelled: {DELETED}"
        finished = self.store.finish_job(record.id, CANCELLED, error=error, error_status=409)
        if not self._finished(record.id, CANCELLED, error, finished):
            return False
        job = self._forget(record.id)
        if job is not None:
            self.jobs.cancel(job, DELETED)
        else:
            self.store.request_cancel(record.id)
        return True

    def cancel_flagged(self) -> None:
        """Stop local jobs that were cancelled through another replica."""
        with self._lock:
            live = list(self._live.items())
        for job_id, job in live:
            if self.store.cancel_requested(job_id):
                self._forget(job_id)
                self.jobs.cancel(job, DELETED)

    def heartbeat(self) -> list[str]:
        """Say this replica lives; re-queue jobs whose lease lapsed, failing those out of attempts."""
        self.store.heartbeat(self.replica)
        failed = self.reclaim()
        self._release_settled()
        metrics.ASYNC_QUEUED.set(self.store.queued_count())
        return failed

    def reclaim(self) -> list[str]:
        tries = "once" if self.max_attempts == 1 else f"{self.max_attempts} times"
        reason = f"job failed: {WORKER_LOST}; it was tried {tries} (--max-attempts); retry it"
        failed = self.store.reclaim_lapsed(self.max_attempts, reason)
        if failed:
            log.warning("failed %d jobs whose worker was lost on every attempt", len(failed))
        for job_id in failed:
            self._finished(job_id, FAILED, reason, True)
        return failed

    def _release_settled(self) -> None:
        """Free the quota slots of jobs accepted here that became final anywhere."""
        with self._lock:
            held = list(self._admitted)
        for job_id in held:
            record = self.store.get_job(job_id)
            if record is None or record.status in FINAL:
                self._release(job_id)

    def _release(self, job_id: str) -> None:
        with self._lock:
            token = self._admitted.pop(job_id, None)
        if token is not None:
            token.future.cancel()

    def sweep(self) -> int:
        return self.store.sweep(self.ttl_s)

    async def keep_state(self) -> None:
        """Lease and run queued jobs; heartbeat (re-queueing lapsed leases), pick up remote cancels,
        expire old results. Cancelling it stops leasing; a job already leased runs on to its end."""
        runner = asyncio.ensure_future(self.runner.run())
        try:
            await self._keep()
        finally:
            runner.cancel()

    async def _keep(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(REPLICA_HEARTBEAT_S)
            try:
                await asyncio.to_thread(self.heartbeat)
                await asyncio.to_thread(self.cancel_flagged)
                if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    await asyncio.to_thread(self.sweep)
            except StateStoreError as exc:  # the store is down: say so, keep serving sync requests
                log.error("state store: %s", exc)

    async def settle(self, timeout: float) -> None:
        """Wait for this process's finishing jobs to store their outcome."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    def _forget(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.pop(job_id, None)

    def _finished(self, job_id: str, status: str, error: str | None, finished: bool) -> bool:
        self._release(job_id)
        if finished:
            try:
                self._announce(job_id, status, error)
            except Exception:  # the job is final for its clients either way
                log.exception("announcing the end of job %s failed", job_id)
        return finished

    def _announce(self, job_id: str, status: str, error: str | None) -> None:
        """A job became final (once per job, from a thread): send its webhook if it asked for one."""
        if self.webhooks is None:
            return
        record = self.store.get_job(job_id)
        if record is None or not record.webhook_url:
            return
        response_url = record.result_url if status == COMPLETED else None
        if status == CANCELLED:
            error = None
        self.webhooks.enqueue(job_id, EVENT_TYPES[status], status, response_url, error, record.webhook_url)


def _same_request(held: JobRecord, request_hash: str | None) -> JobRecord:
    """The job an Idempotency-Key already holds; `Conflict` when it was stored for another request."""
    if held.request_hash != request_hash:
        raise Conflict(
            f"Idempotency-Key {held.idempotency_key!r} was used for another request "
            f"(job {held.id}); use a new key for a new request"
        )
    return held
