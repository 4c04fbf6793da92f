"""Async jobs as clients see them: records and bodies in the shared state store, jobs in this process.

The store holds what any replica must answer (status, error, owner, the finished body); this
object adds the live `Job` handles of the jobs this process queued, so a cancel reaches the worker
at once, and a cancel that arrived through another replica is picked up by `cancel_flagged`.
Store calls block briefly (SQLite on local disk, a Redis round trip): the service runs them off
the event loop.

Whoever makes a job final in the store (this replica's worker, a DELETE on any replica, the
heartbeat failing a lost replica's jobs) calls `on_final` once: that is where webhooks are sent from.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

from octoflux.core.errors import DELETED, WORKER_LOST
from octoflux.core.queue import Job, JobQueue
from octoflux.core.step_events import StepPublisher
from octoflux.state.records import CANCELLED, COMPLETED, FAILED, JobRecord
from octoflux.state.store import StateStore

log = logging.getLogger(__name__)

# The owner of stored link images: not a sha256 hex digest, so no token's owner key equals it.
LINKS_OWNER = "links"

# A replica that has not heartbeated for this long is taken for dead and its jobs are failed.
HEARTBEAT_EVERY_S = 2.0
LEASE_S = 10.0

# (job id, final status, error): called once per job, by whoever made it final in the store.
FinalListener = Callable[[str, str, str | None], None]


class AsyncJobs:
    def __init__(self, store: StateStore, replica: str, ttl_s: float, on_final: FinalListener | None = None):
        self.store = store
        self.replica = replica
        self.ttl_s = ttl_s
        self.on_final = on_final
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
        # Before the job is queued (the record exists by then), so no start or step is missed.
        job.start_listeners.append(lambda started: self.store.mark_running(started.id))
        job.step_listeners.append(StepPublisher(self.store, job.id))
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
        return self._finished(job_id, COMPLETED, None, self.store.finish_job(job_id, COMPLETED, body=body))

    def fail(self, job_id: str, status: str, message: str, http_status: int) -> bool:
        self._forget(job_id)
        finished = self.store.finish_job(job_id, status, error=message, error_status=http_status)
        return self._finished(job_id, status, message, finished)

    def _finished(self, job_id: str, status: str, error: str | None, finished: bool) -> bool:
        if finished and self.on_final is not None:
            try:
                self.on_final(job_id, status, error)
            except Exception:  # the job is final for its clients either way
                log.exception("announcing the end of job %s failed", job_id)
        return finished

    def cancel(self, record: JobRecord, queue: JobQueue) -> bool:
        """Cancelled for the client at once; the replica that holds the job stops it."""
        error = f"job cancelled: {DELETED}"
        finished = self.store.finish_job(record.id, CANCELLED, error=error, error_status=409)
        if not self._finished(record.id, CANCELLED, error, finished):
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
        reason = f"job failed: {WORKER_LOST}; retry it"
        orphans = self.store.fail_orphans(LEASE_S, reason)
        if orphans:
            log.warning("failed %d jobs whose replica was lost", len(orphans))
        for job_id in orphans:
            self._finished(job_id, FAILED, reason, True)
        return orphans

    def sweep(self) -> int:
        return self.store.sweep(self.ttl_s)

    def _forget(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.pop(job_id, None)

    # Keyless links to images (OpenAI's `response_format: url`): the images are stored as a finished
    # job owned by LINKS_OWNER, which no bearer token hashes to, so only the links reach them.

    def store_links(self, tokens: list[str], result, media_type: str, request_id: str) -> None:
        holder = f"links_{uuid.uuid4().hex}"
        now = time.time()
        record = JobRecord(
            id=holder, owner=LINKS_OWNER, request_id=request_id, created_at=now, replica=self.replica
        )
        body = json.dumps({"media_type": media_type, "images": [item.image_b64 for item in result.images]})
        self.store.create_job(record)
        self.store.finish_job(holder, "completed", body=body.encode())
        for index, token in enumerate(tokens):
            self.store.put_link(token, holder, index, now + self.ttl_s)

    def linked_image(self, token: str) -> tuple[bytes, str] | None:
        found = self.store.get_link(token)
        record = self.store.get_job(found[0]) if found is not None else None
        if record is None or record.owner != LINKS_OWNER or self._expired(record):
            return None
        body = self.store.get_body(record.id)
        if body is None:
            return None
        stored = json.loads(body)
        return base64.b64decode(stored["images"][found[1]]), stored["media_type"]
