"""Async jobs, their whole life: accept, run, finish, poll, result, cancel, announce, expire.

The state store holds what any replica must answer (status, error, owner, the finished body, the
result URL a webhook carries); this object adds the live `Job` handles of the jobs this process
queued, so a cancel reaches the worker at once, and a cancel that arrived through another replica is
picked up by `cancel_flagged`. Store calls block briefly (SQLite on local disk, a Redis round trip):
every `async def` here runs them off the event loop.

Whoever makes a job final in the store (this replica's worker, a DELETE on any replica, the
heartbeat failing a lost replica's jobs) announces it once: that is where webhooks are sent from.
A job rolled back before its id was handed out is never announced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from octoflux.core import metrics
from octoflux.core.errors import DELETED, WORKER_LOST, Conflict, InvalidField, JobCancelled, NotFound, problem
from octoflux.core.generation import Generated, record_success, render_timed, trace_job
from octoflux.core.progress import ProgressEvent, StepPublisher, Watched, final_event, watch_job
from octoflux.core.queue import Job, JobQueue, new_job
from octoflux.core.request import Caller
from octoflux.core.runtime import Runtime
from octoflux.pipelines.engine import GenerationSpec
from octoflux.state.records import CANCELLED, COMPLETED, FAILED, FINAL, JobRecord
from octoflux.state.store import StateStore, StateStoreError
from octoflux.webhooks.dispatcher import WebhookDispatcher
from octoflux.webhooks.message import EVENT_TYPES
from octoflux.webhooks.urls import WebhookUrlError, check_webhook_url

log = logging.getLogger(__name__)
job_log = logging.getLogger("octoflux.access")

# How often a replica says it lives; one silent for LEASE_S is taken for dead and its jobs failed.
REPLICA_HEARTBEAT_S = 2.0
LEASE_S = 10.0
SWEEP_EVERY_S = 60.0

# A dialect's stored body for a completed job (what its result URL returns); runs on a worker thread.
RenderBody = Callable[[Generated], bytes]


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
    ):
        self.store = store
        self.replica = replica
        self.ttl_s = ttl_s
        self.runtime = runtime
        self.jobs = jobs
        self.webhooks = webhooks
        self.webhook_allow_private = webhook_allow_private
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

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
        render: RenderBody,
        *,
        webhook_url: str | None = None,
        result_url: Callable[[str], str] | None = None,
    ) -> JobRecord:
        """Queue the job and keep its outcome for the poll URL; returns at once.

        `result_url(job_id)` is the absolute URL a completed job's webhook carries, stored with the
        job so whichever replica makes it final can announce it. The record is stored before the job
        is queued, so even a job that finishes at once has one.
        """
        self.runtime.check_accepting()
        self.jobs.check_room()
        job = new_job(spec, api=caller.api, request_id=caller.request_id, timeout=None)
        caller.trace.job_id = job.id
        url = result_url(job.id) if result_url is not None else None
        record = await asyncio.to_thread(
            self.create, job, owner=caller.owner, webhook_url=webhook_url, result_url=url
        )
        try:
            self.jobs.enqueue(job)
        except Exception as exc:  # filled up meanwhile: the id was never handed out, so nobody hears of it
            found = problem(exc)
            await asyncio.to_thread(self.fail, job.id, FAILED, found.message, found.status, announce=False)
            raise
        task = asyncio.ensure_future(self._finish(job, caller, render))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    def create(
        self, job: Job, *, owner: str | None, webhook_url: str | None = None, result_url: str | None = None
    ) -> JobRecord:
        record = JobRecord(
            id=job.id,
            owner=owner,
            request_id=job.request_id,
            created_at=time.time(),
            replica=self.replica,
            webhook_url=webhook_url,
            result_url=result_url,
        )
        with self._lock:
            self._live[job.id] = job
        self.store.create_job(record)
        # Before the job is queued (the record exists by then), so no start or step is missed.
        job.start_listeners.append(lambda started: self.store.mark_running(started.id))
        job.step_listeners.append(StepPublisher(self.store, job.id))
        return record

    async def _finish(self, job: Job, caller: Caller, render: RenderBody) -> None:
        line: dict = {"event": "job", "request_id": job.request_id, "api": caller.api, "mode": job.spec.mode}
        try:
            result = await asyncio.wrap_future(job.future)
            body = await render_timed(render, Generated.of(result, job.spec), caller.trace)
        except Exception as exc:
            found = problem(exc)
            cancelled = isinstance(exc, JobCancelled) and exc.reason == DELETED
            status = CANCELLED if cancelled else FAILED
            await asyncio.to_thread(self.fail, job.id, status, found.message, found.status)
            metrics.ERRORS.labels(found.kind).inc()
            trace_job(caller.trace, job)
            line.update(status=status, error=found.kind, **caller.trace.fields())
        else:
            await asyncio.to_thread(self.complete, job.id, body)
            record_success(job, caller.api, len(job.spec.seeds))
            trace_job(caller.trace, job)
            line.update(status=COMPLETED, **caller.trace.fields())
        job_log.info(json.dumps(line))

    # ------------------------------------------------------------------ what owners see

    async def find(self, response_id: str, owner: str | None) -> JobRecord:
        record = await asyncio.to_thread(self.get, response_id, owner)
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
        body = await asyncio.to_thread(self.store.get_body, record.id)
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
        """Say this replica lives; fail the jobs of replicas that stopped saying so."""
        self.store.heartbeat(self.replica)
        reason = f"job failed: {WORKER_LOST}; retry it"
        orphans = self.store.fail_orphans(LEASE_S, reason)
        if orphans:
            log.warning("failed %d jobs whose replica was lost", len(orphans))
        for job_id in orphans:
            self._finished(job_id, FAILED, reason, True)
        return orphans

    def sweep(self) -> int:
        return self.store.sweep(self.ttl_s)

    async def keep_state(self) -> None:
        """Heartbeat (failing jobs of lost replicas), pick up remote cancels, expire old results."""
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
