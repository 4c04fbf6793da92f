"""Async jobs as clients see them: records and bodies in the shared state store, jobs in this process.

The store holds what any replica must answer (status, error, owner, the finished body); this
object adds the live `Job` handles of the jobs this process queued, so a cancel reaches the worker
at once, and a cancel that arrived through another replica is picked up by `cancel_flagged`.
Store calls block briefly (SQLite on local disk, a Redis round trip): the service runs them off
the event loop.
"""

from __future__ import annotations

import logging
import threading
import time

from server.errors import DELETED, WORKER_LOST
from server.jobs import Job, JobQueue
from server.records import CANCELLED, JobRecord
from server.state_store import StateStore

log = logging.getLogger(__name__)

# A replica that has not heartbeated for this long is taken for dead and its jobs are failed.
HEARTBEAT_EVERY_S = 2.0
LEASE_S = 10.0


class AsyncJobs:
    def __init__(self, store: StateStore, replica: str, ttl_s: float):
        self.store = store
        self.replica = replica
        self.ttl_s = ttl_s
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()

    def create(
        self, job: Job, *, owner: str | None, encoding: str, webhook_url: str | None = None
    ) -> JobRecord:
        record = JobRecord(
            id=job.id,
            owner=owner,
            request_id=job.request_id,
            created_at=time.time(),
            replica=self.replica,
            encoding=encoding,
            webhook_url=webhook_url,
        )
        with self._lock:
            self._live[job.id] = job
        self.store.create_job(record)
        job.start_listeners.append(lambda started: self.store.mark_running(started.id))
        if job.started_at is not None:  # the worker took it before the listener was there
            self.store.mark_running(job.id)
        return record

    def get(self, job_id: str, owner: str | None) -> JobRecord | None:
        """The record, if it exists, has not expired, and belongs to `owner`."""
        record = self.store.get_job(job_id)
        if record is None or record.owner != owner or self._expired(record):
            return None
        return record

    def _expired(self, record: JobRecord) -> bool:
        return record.finished_at is not None and time.time() - record.finished_at >= self.ttl_s

    def body(self, job_id: str) -> bytes | None:
        return self.store.get_body(job_id)

    def complete(self, job_id: str, body: bytes) -> bool:
        self._forget(job_id)
        return self.store.finish_job(job_id, "completed", body=body)

    def fail(self, job_id: str, status: str, message: str, http_status: int) -> bool:
        self._forget(job_id)
        return self.store.finish_job(job_id, status, error=message, error_status=http_status)

    def cancel(self, record: JobRecord, queue: JobQueue) -> bool:
        """Cancelled for the client at once; the replica that holds the job stops it."""
        if not self.store.finish_job(
            record.id, CANCELLED, error=f"job cancelled: {DELETED}", error_status=409
        ):
            return False
        job = self._forget(record.id)
        if job is not None:
            queue.cancel(job, DELETED)
        else:
            self.store.request_cancel(record.id)
        return True

    def cancel_flagged(self, queue: JobQueue) -> None:
        """Stop local jobs that were cancelled through another replica."""
        with self._lock:
            live = list(self._live.items())
        for job_id, job in live:
            if self.store.cancel_requested(job_id):
                self._forget(job_id)
                queue.cancel(job, DELETED)

    def heartbeat(self) -> list[str]:
        """Say this replica lives; fail the jobs of replicas that stopped saying so."""
        self.store.heartbeat(self.replica)
        orphans = self.store.fail_orphans(LEASE_S, f"job failed: {WORKER_LOST}; retry it")
        if orphans:
            log.warning("failed %d jobs whose replica was lost", len(orphans))
        return orphans

    def sweep(self) -> int:
        return self.store.sweep(self.ttl_s)

    def _forget(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.pop(job_id, None)
