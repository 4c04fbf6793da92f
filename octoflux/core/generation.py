"""Generation as every dialect asks for it: prepare an `ImageRequest`, run it, hand back `Generated`.

The result is the engine's images with their seeds and safety verdicts; encoding them into a wire
format is the dialect's business. A synchronous caller waits here; a client that goes away, or the
deadline, cancels the job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from octoflux.core import metrics
from octoflux.core.errors import CLIENT_GONE, TIMEOUT, JobCancelled
from octoflux.core.queue import Job, JobQueue
from octoflux.core.quotas import admitted
from octoflux.core.request import Caller, ImageRequest, JobTrace
from octoflux.core.runtime import Runtime
from octoflux.core.spec import build_spec, check_loras
from octoflux.pipelines.engine import GenerationResult, GenerationSpec
from octoflux.pipelines.family import Family

Body = TypeVar("Body")
# A dialect's rendering of a finished request (its wire body); runs on a worker thread.
Render = Callable[["Generated"], Body]


@dataclass
class GeneratedImage:
    image: object  # PIL.Image.Image
    seed: int
    removed_for_safety: bool
    safety_score: float | None


@dataclass
class Generated:
    """One finished request: images in order, the size they have, and the generation's own seconds."""

    images: list[GeneratedImage]
    width: int
    height: int
    seconds: float

    @classmethod
    def of(cls, result: GenerationResult, spec: GenerationSpec) -> Generated:
        images = [
            GeneratedImage(image, seed, removed, score)
            for image, seed, removed, score in zip(
                result.images, spec.seeds, result.removed_for_safety, result.safety_scores, strict=True
            )
        ]
        return cls(images, spec.width, spec.height, result.seconds)


def trace_job(trace: JobTrace, job: Job) -> None:
    trace.job_id = job.id
    trace.queue_wait_ms = round(job.queue_wait * 1000, 1)
    trace.gpu_ms = round(job.gpu_seconds * 1000, 1)


async def render_timed(render: Render[Body], generated: Generated, trace: JobTrace) -> Body:
    """Encoding is CPU work of milliseconds per image: off the event loop, timed for the log line."""
    started = time.monotonic()
    body = await run_in_threadpool(render, generated)
    trace.encode_ms = round((time.monotonic() - started) * 1000, 1)
    return body


def record_success(job: Job, api: str, images: int) -> None:
    metrics.REQUEST_SECONDS.labels(job.spec.mode, api).observe(time.monotonic() - job.enqueued_at)
    metrics.IMAGES_GENERATED.labels(job.spec.mode).inc(images)


class Generation:
    def __init__(self, runtime: Runtime, jobs: JobQueue, request_timeout: float):
        self.runtime = runtime
        self.jobs = jobs
        self.request_timeout = request_timeout or None

    async def prepare(
        self, request: ImageRequest, family: Family | None = None, space: str | None = None
    ) -> GenerationSpec:
        """The request as a spec with the served model's defaults; `InvalidField` if unusable. LoRA
        names resolve in `space` (the caller's own assets, `Tenant.asset_space`), then shared ones."""
        self.runtime.check_accepting()
        family = family or self.runtime.served_family()
        spec = await run_in_threadpool(build_spec, request, family)
        models = self.runtime.models
        serves_loras = models is not None and models.engine(family.model_id).loras is not None
        loras = check_loras(spec.loras, self.runtime.library if serves_loras else None, space)
        return replace(spec, loras=loras)

    async def generate(self, spec: GenerationSpec, caller: Caller, render: Render[Body]) -> Body:
        """Wait for the job (a client that goes away, or the deadline, cancels it), then `render` it."""
        self.runtime.check_accepting()
        job = admitted(
            caller,
            spec,
            lambda: self.jobs.submit(
                spec,
                api=caller.api,
                request_id=caller.request_id,
                timeout=self.request_timeout,
                owner=caller.owner,
            ),
        )
        caller.trace.job_id = job.id
        try:
            result = await self._wait(job, caller)
        finally:
            trace_job(caller.trace, job)
        body = await render_timed(render, Generated.of(result, spec), caller.trace)
        record_success(job, caller.api, len(spec.seeds))
        return body

    async def _wait(self, job: Job, caller: Caller) -> GenerationResult:
        outcome = asyncio.wrap_future(job.future)
        # The outcome is read even when nobody waits any longer, so asyncio never warns about it.
        outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        waiting = {outcome}
        gone = asyncio.ensure_future(caller.client_gone()) if caller.client_gone is not None else None
        if gone is not None:
            waiting.add(gone)
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=self.request_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if gone is not None:
                gone.cancel()
        if outcome in done:
            return outcome.result()
        reason = CLIENT_GONE if gone is not None and gone in done else TIMEOUT
        self.jobs.cancel(job, reason)
        raise JobCancelled(reason, started=job.started_at is not None)
