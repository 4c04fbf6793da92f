"""The bounded FIFO queue between HTTP handlers and the one worker thread that owns the GPU."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from pipelines.engine import Engine, GenerationCancelled, GenerationResult, GenerationSpec

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room in the queue; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Job:
    spec: GenerationSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future[GenerationResult] = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    def cancel(self) -> None:
        """Drop the job if queued; stop it at the next denoising step if running."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class JobQueue:
    """FIFO of jobs, consumed by a single worker thread that calls `Engine.generate`."""

    def __init__(self, max_queue: int):
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self._thread: threading.Thread | None = None
        self._running: Job | None = None
        self._seconds_per_job = 1.0  # moving average, used for Retry-After

    @property
    def depth(self) -> int:
        """Jobs waiting, not counting the one running."""
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        return int(self._running is not None)

    def submit(self, spec: GenerationSpec) -> Job:
        job = Job(spec=spec)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after_seconds()) from None
        return job

    def retry_after_seconds(self) -> int:
        waiting = self.depth + self.in_flight
        return max(1, math.ceil(waiting * self._seconds_per_job))

    def start(self, engine: Engine) -> None:
        self._thread = threading.Thread(
            target=self._work, args=(engine,), name="octoflux-worker", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued, let the worker exit after its current job."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.future.set_exception(GenerationCancelled("server shutting down"))
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _work(self, engine: Engine) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                job.future.set_exception(GenerationCancelled("cancelled while queued"))
                continue
            self._run(engine, job)

    def _run(self, engine: Engine, job: Job) -> None:
        self._running = job
        job.started_at = time.monotonic()
        try:
            result = engine.generate(job.spec, should_stop=lambda: job.cancelled)
        except BaseException as exc:  # the worker must survive anything a job raises
            if not isinstance(exc, GenerationCancelled):
                log.exception("job %s failed", job.id)
            job.future.set_exception(exc)
        else:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * result.seconds
            job.future.set_result(result)
        finally:
            self._running = None
