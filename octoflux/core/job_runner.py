"""The durable queue's consumer in this process: lease an async job from the state store when the worker
has room, run it, renew the lease while it runs, store the outcome once.

One leased job at a time per process: the others stay in the store, free for any process with room, so
under `--replicas` a long job never holds others behind it. A job cancelled by a shutdown (still queued
here, or running past `--shutdown-timeout`) is put back in the store's queue without counting an
attempt; a killed process simply stops renewing, and its lease lapses (`AsyncJobs.reclaim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from octoflux.core import metrics
from octoflux.core.errors import DELETED, SHUTDOWN, JobCancelled, QueueFull, ShuttingDown, problem
from octoflux.core.generation import Generated, record_success, render_timed, trace_job
from octoflux.core.queue import Job, new_job
from octoflux.core.renderers import UnknownDialect, renderer_for
from octoflux.core.request import JobTrace
from octoflux.core.stored_request import StoredRequest, UnreadableRequest
from octoflux.state.records import CANCELLED, COMPLETED, FAILED, LeasedJob
from octoflux.state.store import StateStoreError

if TYPE_CHECKING:
    from octoflux.core.async_jobs import AsyncJobs

log = logging.getLogger(__name__)
job_log = logging.getLogger("octoflux.access")

# How often an idle process looks for queued jobs another process stored (its own wake it at once).
POLL_S = 0.25
RECLAIM_EVERY_S = 1.0
# A finished job's outcome is written again this often while the store fails, for up to one lease.
STORE_RETRY_S = 1.0


class JobRunner:
    def __init__(self, owner: AsyncJobs, lease_s: float):
        self.owner = owner
        self.lease_s = lease_s
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """A job was stored here: look for it now instead of at the next poll."""
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Lease and run jobs until cancelled; the job running then finishes on its own task.

        The next job is leased as soon as the worker is free, while the last one's body is rendered
        and stored."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        last_reclaim = 0.0
        while True:
            self._wake.clear()
            leased = None
            if self.owner.runtime is not None and self.owner.runtime.ready:
                try:
                    if time.monotonic() - last_reclaim > RECLAIM_EVERY_S:
                        last_reclaim = time.monotonic()
                        await asyncio.to_thread(self.owner.reclaim)
                    leased = await self._lease_next()
                except StateStoreError as exc:
                    log.error("state store: %s", exc)
            if leased is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                continue
            worker_free: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._run(leased, worker_free))
            self.owner._tasks.add(task)
            task.add_done_callback(self.owner._tasks.discard)
            if not await asyncio.shield(worker_free):  # put back (queue full of sync work): wait, retry
                await asyncio.sleep(POLL_S)

    async def _lease_next(self) -> LeasedJob | None:
        """The next job, leased to this process; a lease taken as this loop is stopped is put back."""
        store, replica = self.owner.store, self.owner.replica
        lease = asyncio.ensure_future(asyncio.to_thread(store.lease_job, replica, self.lease_s))
        try:
            return await asyncio.shield(lease)
        except asyncio.CancelledError:
            leased = await lease
            if leased is not None:
                await asyncio.to_thread(store.release_job, leased.record.id, replica)
            raise

    async def _run(self, leased: LeasedJob, worker_free: asyncio.Future[bool]) -> None:
        """Run one leased job to a stored outcome. `worker_free` turns True once its outcome is
        stored, False when the job went straight back to the queue."""

        def free(taken: bool) -> None:  # on the event loop's thread
            if not worker_free.done():
                worker_free.set_result(taken)

        try:
            await self._run_leased(leased, free)
        finally:
            free(True)

    async def _run_leased(self, leased: LeasedJob, free: Callable[[bool], None]) -> None:
        record = leased.record
        try:
            stored = await asyncio.to_thread(StoredRequest.from_bytes, leased.request)
            render = renderer_for(stored.dialect, stored.options)
        except (UnreadableRequest, UnknownDialect) as exc:
            await asyncio.to_thread(self.owner.fail, record.id, FAILED, f"job failed: {exc}", 500)
            return
        job = new_job(
            stored.spec, api="async", request_id=record.request_id, timeout=None, owner=record.owner
        )
        job.id = record.id
        self.owner.adopt(job)
        try:
            self.owner.jobs.enqueue(job)
        except (QueueFull, ShuttingDown):
            self.owner._forget(job.id)
            await self._put_back(job.id)
            free(False)
            return
        # The next job is leased only once this one's outcome is stored (`_run` frees the worker then): a
        # next job that kills the process can never cost this one its finished result and an attempt.
        if record.attempts > 1:
            log.info("job %s: attempt %d", job.id, record.attempts)
        await self._renew_until_done(job)
        await self._store_outcome(job, render)

    async def _renew_until_done(self, job: Job) -> None:
        outcome = asyncio.wrap_future(job.future)
        outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        while True:
            done, _ = await asyncio.wait({outcome}, timeout=self.lease_s / 3)
            if done:
                return
            try:
                held = await asyncio.to_thread(
                    self.owner.store.renew_lease, job.id, self.owner.replica, self.lease_s
                )
            except StateStoreError as exc:
                log.error("state store: %s", exc)
                continue
            if not held:  # our lease lapsed (the process stalled) and another may run it: first result wins
                log.warning("job %s: lease lost while running", job.id)

    async def _store_outcome(self, job: Job, render) -> None:
        trace = JobTrace(job_id=job.id)
        line: dict = {"event": "job", "request_id": job.request_id, "api": job.api, "mode": job.spec.mode}
        try:
            result = job.future.result()
            body = await render_timed(render, Generated.of(result, job.spec), trace)
        except JobCancelled as exc:
            if exc.reason == SHUTDOWN:
                self.owner._forget(job.id)
                await self._put_back(job.id)
                trace_job(trace, job)
                line.update(status="requeued", **trace.fields())
            else:
                await self._fail(job, exc, line, trace, CANCELLED if exc.reason == DELETED else FAILED)
        except Exception as exc:
            await self._fail(job, exc, line, trace, FAILED)
        else:
            if not await self._write_outcome(job.id, self.owner.complete, job.id, body):
                return
            record_success(job, job.api, len(job.spec.seeds))
            trace_job(trace, job)
            line.update(status=COMPLETED, **trace.fields())
        job_log.info(json.dumps(line))

    async def _fail(self, job: Job, exc: Exception, line: dict, trace: JobTrace, status: str) -> None:
        found = problem(exc)
        await self._write_outcome(job.id, self.owner.fail, job.id, status, found.message, found.status)
        metrics.ERRORS.labels(found.kind).inc()
        trace_job(trace, job)
        line.update(status=status, error=found.kind, **trace.fields())

    async def _write_outcome(self, job_id: str, write: Callable[..., object], *args) -> bool:
        """`write(*args)` (the job's final record), tried again while the store fails, for up to one
        lease; False once given up: the lease lapses and the job runs again, its result never lost
        silently."""
        deadline = time.monotonic() + self.lease_s
        while True:
            try:
                await asyncio.to_thread(write, *args)
                return True
            except StateStoreError as exc:
                if time.monotonic() >= deadline:
                    log.error("job %s: its outcome could not be stored (%s); it will run again", job_id, exc)
                    return False
                await asyncio.sleep(STORE_RETRY_S)

    async def _put_back(self, job_id: str) -> None:
        try:
            if await asyncio.to_thread(self.owner.store.release_job, job_id, self.owner.replica):
                log.info("job %s: back in the queue for the next process", job_id)
        except StateStoreError as exc:  # its lease lapses instead
            log.error("state store: %s", exc)
