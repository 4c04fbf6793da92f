"""Async jobs and their results: kept for a TTL, in memory up to a budget, spilled to disk past it.

Used only from the event loop thread, so it needs no lock.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from server import metrics
from server.jobs import Job

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
FINAL = (COMPLETED, FAILED, CANCELLED)


def owner_key(token: str | None) -> str | None:
    """What a record remembers of the token that created it: a hash, never the token."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


@dataclass
class AsyncRecord:
    id: str
    owner: str | None
    request_id: str
    created_at: float  # time.time(), reported to clients
    job: Job | None
    status: str = PENDING
    error: str | None = None
    error_status: int | None = None
    finished_at: float | None = None  # time.monotonic(), for the TTL
    body: bytes | None = None
    path: Path | None = None
    size: int = 0

    def current_status(self) -> str:
        if self.status == PENDING and self.job is not None and self.job.started_at is not None:
            return RUNNING
        return self.status


class ResultStore:
    """Async records by id; finished ones expire `ttl` seconds after they finish."""

    def __init__(self, ttl: float, max_bytes: int, spill_dir: Path | None = None):
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._spill_dir = spill_dir
        self._own_spill_dir = False
        self._records: dict[str, AsyncRecord] = {}
        # Finished records in the order they finished: the front expires and spills first.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.memory_bytes = 0
        self.disk_bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def create(self, job: Job, owner: str | None) -> AsyncRecord:
        self.sweep()
        record = AsyncRecord(
            id=job.id, owner=owner, request_id=job.request_id, created_at=time.time(), job=job
        )
        self._records[record.id] = record
        self._update_gauges()
        return record

    def get(self, record_id: str, owner: str | None) -> AsyncRecord | None:
        """The record, if it exists, has not expired, and belongs to `owner`."""
        self.sweep()
        record = self._records.get(record_id)
        if record is None or record.owner != owner:
            return None
        return record

    def complete(self, record: AsyncRecord, body: bytes) -> None:
        if record.status in FINAL:  # cancelled by DELETE just as it finished
            return
        record.body, record.size = body, len(body)
        self.memory_bytes += record.size
        self._finish(record, COMPLETED)
        self._spill_over_budget()

    def fail(self, record: AsyncRecord, status: str, message: str, http_status: int) -> None:
        if record.status in FINAL:
            return
        record.error, record.error_status = message, http_status
        self._finish(record, status)

    def read(self, record: AsyncRecord) -> bytes | None:
        """The stored body, from memory or its spill file; None if it is gone (expired meanwhile)."""
        body, spilled = record.body, record.path  # one snapshot: a spill may change the record
        if body is not None:
            return body
        try:
            return spilled.read_bytes() if spilled is not None else None
        except FileNotFoundError:
            return None

    def sweep(self) -> None:
        """Forget finished records older than the TTL."""
        now = time.monotonic()
        while self._finished:
            record = self._records[next(iter(self._finished))]
            if record.finished_at is None or now - record.finished_at < self.ttl:
                break
            self._forget(record)

    def close(self) -> None:
        for record in list(self._records.values()):
            self._forget(record)
        if self._own_spill_dir and self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def _finish(self, record: AsyncRecord, status: str) -> None:
        record.status = status
        record.finished_at = time.monotonic()
        record.job = None
        self._finished[record.id] = None
        self._update_gauges()

    def _forget(self, record: AsyncRecord) -> None:
        self._records.pop(record.id, None)
        self._finished.pop(record.id, None)
        if record.body is not None:
            self.memory_bytes -= record.size
            record.body = None
        if record.path is not None:
            self.disk_bytes -= record.size
            record.path.unlink(missing_ok=True)
            record.path = None
        self._update_gauges()

    def _spill_over_budget(self) -> None:
        """Move the oldest in-memory results to disk until memory is within budget."""
        for record_id in list(self._finished):
            if self.memory_bytes <= self.max_bytes:
                break
            record = self._records[record_id]
            if record.body is None:
                continue
            path = self._spill_path(record.id)
            path.write_bytes(record.body)
            record.path, record.body = path, None
            self.memory_bytes -= record.size
            self.disk_bytes += record.size
        self._update_gauges()

    def _spill_path(self, record_id: str) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="octoflux-results-"))
            self._own_spill_dir = True
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir / f"{record_id}.json"

    def _update_gauges(self) -> None:
        metrics.ASYNC_RESULTS.set(len(self._records))
        metrics.ASYNC_RESULT_BYTES.labels("memory").set(self.memory_bytes)
        metrics.ASYNC_RESULT_BYTES.labels("disk").set(self.disk_bytes)
