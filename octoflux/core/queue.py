"""The bounded queue between HTTP handlers and the one worker thread that owns the GPU.

Owners (API keys) take turns (`FairQueue`); each owner's jobs run in order. Admission (429 with a
Retry-After from measured throughput), deadlines, cancellation at the next denoising step, and a
drain for graceful shutdown all live here. Async jobs wait in the state store and enter this queue
one at a time when leased (octoflux/core/job_runner.py).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from octoflux.core import metrics
from octoflux.core.errors import (
    CLIENT_GONE,
    DELETED,
    SHUTDOWN,
    TIMEOUT,
    JobCancelled,
    QueueFull,
    ShuttingDown,
)
from octoflux.core.fair_queue import FairQueue
from octoflux.pipelines.engine import (
    Engine,
    GenerationCancelled,
    GenerationFailed,
    GenerationResult,
    GenerationSpec,
    OutOfMemory,
    StepEvent,
)
from octoflux.pipelines.loras import LoraError

__all__ = ["CLIENT_GONE", "DELETED", "SHUTDOWN", "TIMEOUT", "Job", "JobCancelled", "JobQueue", "QueueFull"]

log = logging.getLogger(__name__)

# Until a job has been measured, assume this many seconds per unit of work (see `work_units`).
DEFAULT_SECONDS_PER_UNIT = 0.5
MAX_RETRY_AFTER = 60


def _settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolve a job's future once; a future its waiter already cancelled is left alone.

    Raising here would kill the worker thread and leave every later job hanging.
    """
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _fan_out(job: Job):
    if not job.step_listeners:
        return None

    def on_step(event: StepEvent) -> None:
        for listener in list(job.step_listeners):
            try:
                listener(event)
            except Exception:  # a broken progress watcher must not fail the generation
                log.exception("step listener of job %s failed", job.id)

    return on_step


def work_units(spec: GenerationSpec) -> float:
    """Relative cost of a job: denoising steps x images x megapixels."""
    return max(1, spec.steps) * len(spec.seeds) * spec.width * spec.height / 2**20


@dataclass(eq=False)  # identity: comparing specs would compare their images pixel by pixel
class Job:
    spec: GenerationSpec
    api: str = "sync"
    request_id: str = ""
    owner: str | None = None  # whose turn it takes in the queue (None: the anonymous owner)
    deadline: float | None = None  # time.monotonic() after which the job is dropped or interrupted
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future[GenerationResult] = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Called with each StepEvent while the job runs (progress, previews); never allowed to fail it.
    step_listeners: list[Callable[[StepEvent], None]] = field(default_factory=list)
    # Called with the job when the worker starts it (the state store marks it running).
    start_listeners: list[Callable[[Job], None]] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None

    def cancel(self, reason: str) -> None:
        """Stop at the next denoising step if running; the queue drops it if waiting."""
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def past_deadline(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline

    @property
    def queue_wait(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at

    @property
    def gpu_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at


def new_job(
    spec: GenerationSpec, *, api: str, request_id: str, timeout: float | None, owner: str | None = None
) -> Job:
    deadline = time.monotonic() + timeout if timeout else None
    return Job(spec=spec, api=api, request_id=request_id, deadline=deadline, owner=owner)


class JobQueue:
    """Jobs by owner in turn, consumed by a single worker thread that calls `Engine.generate`."""

    def __init__(self, max_queue: int):
        self.max_queue = max(1, max_queue)
        self._pending: FairQueue[Job] = FairQueue()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._accepting = True
        self._stopping = False
        self._seconds_per_unit: float | None = None
        self._drained = threading.Event()
        self._drain_started = False

    @property
    def depth(self) -> int:
        """Jobs waiting, not counting the one running."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return int(self._running is not None)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running(self) -> Job | None:
        return self._running

    def submit(
        self,
        spec: GenerationSpec,
        *,
        api: str = "sync",
        request_id: str = "",
        timeout: float | None = None,
        owner: str | None = None,
    ) -> Job:
        """Queue a job, or raise QueueFull / ShuttingDown."""
        return self.enqueue(new_job(spec, api=api, request_id=request_id, timeout=timeout, owner=owner))

    def check_room(self) -> None:
        """QueueFull / ShuttingDown now, before anything is stored for a job that cannot be queued."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after_seconds(), depth=len(self._pending))

    def enqueue(self, job: Job) -> Job:
        """Queue a job made by `new_job`, or raise QueueFull / ShuttingDown."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull(self.retry_after_seconds(), depth=len(self._pending))
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Drop a waiting job at once; a running one stops at its next denoising step."""
        with self._cond:
            job.cancel(reason)
            if job in self._pending:
                self._pending.remove(job)
                _settle(job.future, error=JobCancelled(reason, started=False))

    # Throughput, for Retry-After.

    def observe(self, spec: GenerationSpec, seconds: float) -> None:
        """Fold one measured job into the moving average of seconds per work unit."""
        per_unit = seconds / work_units(spec)
        if self._seconds_per_unit is None:
            self._seconds_per_unit = per_unit
        else:
            self._seconds_per_unit = 0.7 * self._seconds_per_unit + 0.3 * per_unit

    def estimate_seconds(self, spec: GenerationSpec) -> float:
        return work_units(spec) * (self._seconds_per_unit or DEFAULT_SECONDS_PER_UNIT)

    def retry_after_seconds(self) -> int:
        """Seconds until a queue slot is expected to free: what is left of the running job.

        A slot opens when the worker takes the next job, i.e. when the running one ends. Waiting
        for the whole backlog would leave the GPU idle; clients that retry too early get another
        429, and the SDK's backoff spreads them.
        """
        running = self._running
        if running is not None and running.started_at is not None:
            left = self.estimate_seconds(running.spec) - (time.monotonic() - running.started_at)
        elif self._pending:
            left = self.estimate_seconds(self._pending.peek().spec)
        else:
            left = 1.0
        return min(MAX_RETRY_AFTER, max(1, math.ceil(left)))

    # The worker.

    def start(self, engine: Engine) -> None:
        with self._cond:
            if self._stopping:
                return
            self._engine = engine
            self._thread = threading.Thread(target=self._work, name="octoflux-worker", daemon=True)
            self._thread.start()

    def drain(self, timeout: float) -> None:
        """Graceful shutdown: refuse new jobs, cancel the queued ones, let the running one finish.

        A cancelled async job goes back to the state store's queue (its runner releases it).

        The running job is interrupted at its next step if it takes longer than `timeout`
        seconds. Safe to call from several threads; later callers wait for the first.
        """
        with self._cond:
            first = not self._drain_started
            self._drain_started = True
            self._accepting = False
            dropped = self._pending.clear()
            for job in dropped:
                job.cancel(SHUTDOWN)
                _settle(job.future, error=JobCancelled(SHUTDOWN, started=False))
        if not first:
            self._drained.wait(timeout + 30)
            return
        if dropped:
            log.info("shutdown: dropped %d queued jobs", len(dropped))
        self._wait_idle(timeout)
        running = self._running
        if running is not None:
            log.warning("shutdown: interrupting job %s after %.0fs", running.id, timeout)
            running.cancel(SHUTDOWN)
            self._wait_idle(30)  # one denoising step
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        self._drained.set()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running is not None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            job = self._pending.popleft()
            self._running = job
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                if not job.future.set_running_or_notify_cancel():
                    continue  # its waiter gave up (cancelled the future) while it was queued
                if job.past_deadline():
                    job.cancel(TIMEOUT)
                    _settle(job.future, error=JobCancelled(TIMEOUT, started=False))
                else:
                    self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        engine = self._engine
        assert engine is not None
        job.started_at = time.monotonic()
        for listener in job.start_listeners:
            try:
                listener(job)
            except Exception:  # bookkeeping must not stop the job
                log.exception("start listener of job %s failed", job.id)
        mode = job.spec.mode
        metrics.QUEUE_WAIT_SECONDS.labels(mode, job.api).observe(job.queue_wait)
        failure: BaseException | None = None
        try:
            result = engine.generate(job.spec, should_stop=self._stop_check(job), on_step=_fan_out(job))
        except GenerationCancelled:
            failure = JobCancelled(job.cancel_reason or DELETED, started=True)
        except OutOfMemory as exc:
            failure = OutOfMemory(str(exc))
        except LoraError as exc:  # the request's fault (a bad or vanished file): a 422, not a crash
            failure = LoraError(exc.name, str(exc))
        except ShuttingDown as exc:  # the engine is going away under the job (a context-parallel rank lost)
            failure = ShuttingDown(exc.message)
        except GenerationFailed as exc:
            log.exception("job %s failed", job.id)
            failure = GenerationFailed(str(exc))
        except BaseException as exc:  # the worker must survive anything a job raises
            log.exception("job %s failed", job.id)
            failure = GenerationFailed(f"{type(exc).__name__}: {exc}")
        job.finished_at = time.monotonic()
        if failure is None:
            self.observe(job.spec, job.gpu_seconds)
            metrics.GPU_SECONDS.labels(mode).observe(job.gpu_seconds)
            _settle(job.future, result=result)
            return
        # The failure handed to the HTTP side is a fresh exception without a traceback: a
        # traceback would keep the pipeline's frames, and their device tensors, alive.
        if isinstance(failure, OutOfMemory):
            gc.collect()
            engine.free_memory()
        _settle(job.future, error=failure)

    @staticmethod
    def _stop_check(job: Job):
        """The engine's per-step callback: records step times and answers "stop now?"."""
        last_step: list[float] = []

        def should_stop() -> bool:
            now = time.monotonic()
            if last_step:  # the first interval includes text encoding; skip it
                metrics.STEP_SECONDS.observe(now - last_step[0])
                last_step[0] = now
            else:
                last_step.append(now)
            if job.past_deadline(now):
                job.cancel(TIMEOUT)
            return job.cancelled

        return should_stop
