"""`GenerationService`: the server minus HTTP. Routes of every API dialect call it and render its answers.

It owns the engine (loaded in the background), the job queue and its worker, async results, the
LoRA library and the asset API (`octoflux/assets/service.py`), readiness and drain. It raises the
domain errors of `octoflux/core/errors.py`; it never builds an HTTP response and never touches torch
itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property

from PIL import Image
from starlette.concurrency import run_in_threadpool

from octoflux.api.octoai.protocol import GenerateRequest, GenerateResponse, ImageGeneration
from octoflux.assets.service import AssetService
from octoflux.assets.store import AssetStore
from octoflux.core import metrics
from octoflux.core import models as served_family
from octoflux.core.async_jobs import HEARTBEAT_EVERY_S, AsyncJobs
from octoflux.core.codec import encode_images
from octoflux.core.engine_factory import EngineFactory, build_engine
from octoflux.core.errors import (
    CLIENT_GONE,
    DELETED,
    TIMEOUT,
    Conflict,
    InvalidField,
    JobCancelled,
    NotFound,
    NotReady,
    ShuttingDown,
    problem,
)
from octoflux.core.progress import ProgressEvent, final_event
from octoflux.core.queue import Job, JobQueue, new_job
from octoflux.core.runtime import warm_up
from octoflux.core.spec import ImageLimits, build_spec, check_loras
from octoflux.core.step_events import Watched, watch_job
from octoflux.pipelines.engine import Engine, GenerationResult, GenerationSpec
from octoflux.pipelines.family import FAMILIES, Family
from octoflux.pipelines.loras import LoraCache, LoraLibrary
from octoflux.settings import Settings
from octoflux.state.records import CANCELLED, COMPLETED, FAILED, FINAL, JobRecord
from octoflux.state.store import StateStoreError, open_state_store
from octoflux.webhooks.dispatcher import (
    EVENT_TYPES,
    WEBHOOK_HEADER,
    WebhookDispatcher,
    WebhookUrlError,
    check_webhook_url,
)

log = logging.getLogger(__name__)
job_log = logging.getLogger("octoflux.access")

LOADING_RETRY_AFTER = 5


@dataclass(frozen=True)
class Readiness:
    ready: bool
    status: str  # "ready", "loading", "load failed", "shutting down"
    detail: str | None = None


@dataclass(frozen=True)
class AsyncView:
    """An async job as its owner sees it."""

    response_id: str
    status: str
    created_at: float
    error: str | None = None


@dataclass
class Encoded:
    response: GenerateResponse
    seconds: float


class GenerationService:
    def __init__(self, settings: Settings, engine_factory: EngineFactory = build_engine):
        self.settings = settings
        self._engine_factory = engine_factory
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._draining = threading.Event()
        self.jobs = JobQueue(settings.max_queue)
        self.library = LoraLibrary(settings.lora_dir)
        self.replica = uuid.uuid4().hex[:12]
        self.state = open_state_store(settings.resolved_state_url)
        self.assets = AssetService(
            AssetStore(self.library, settings.lora_upload_ttl_s, self.state),
            settings.max_lora_mb,
            lora_cache=self._loaded_loras,
        )
        # Sends from the shared store: deliveries survive a restart, and any live replica sends them.
        self.webhooks = (
            WebhookDispatcher(
                self.state,
                settings.webhook_secret,
                retries=settings.webhook_retries,
                allow_private=settings.webhook_allow_private,
            )
            if settings.webhook_secret
            else None
        )
        self._result_urls: dict[str, str] = {}  # absolute result URL of each running async job
        self.async_jobs = AsyncJobs(self.state, self.replica, settings.result_ttl, on_final=self._announce)
        self.async_jobs.heartbeat()  # before any job of ours is stored, or it would look orphaned
        self.limits = ImageLimits(int(settings.max_image_mb * 2**20), settings.max_image_pixels)
        self._async_tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Build the engine, warm it up and start the worker; raises when the model cannot load."""
        engine = self._engine_factory(self.settings, self.library)
        warm_up(engine, self.settings, self.jobs)
        self.engine = engine
        self.jobs.start(engine)
        if not self._draining.is_set():  # a SIGTERM during loading wins
            self._ready.set()

    def load_in_background(self, on_failure: Callable[[str], None] | None = None) -> threading.Thread:
        """Load on a thread; a failure is kept in `load_error` and handed to `on_failure`."""

        def run() -> None:
            try:
                self.load()
            except Exception as exc:
                self.load_error = f"model load failed: {exc}"
                log.error("%s", self.load_error)
                log.debug("model load traceback", exc_info=True)
                if on_failure is not None:
                    on_failure(self.load_error)

        thread = threading.Thread(target=run, name="octoflux-load", daemon=True)
        thread.start()
        return thread

    def readiness(self) -> Readiness:
        if self._draining.is_set():
            return Readiness(False, "shutting down", "draining")
        if self._ready.is_set():
            return Readiness(True, "ready")
        if self.load_error:
            return Readiness(False, "load failed", self.load_error)
        return Readiness(False, "loading", "loading model")

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def drain(self) -> None:
        """Readiness off first, then refuse new work, fail the queue, and wait for the running job."""
        self._draining.set()
        self._ready.clear()
        self.jobs.drain(self.settings.shutdown_timeout)

    def start_webhooks(self) -> None:
        if self.webhooks is not None:
            self.webhooks.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.drain)
        if self._async_tasks:
            await asyncio.wait(self._async_tasks, timeout=5)
        if self.webhooks is not None:  # what it has not sent waits in the store for the next process
            await asyncio.to_thread(self.webhooks.stop)
        self.state.close()

    async def keep_state(self, sweep_every: float = 60.0) -> None:
        """Heartbeat (failing jobs of lost replicas), pick up remote cancels, expire old results."""
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            try:
                await asyncio.to_thread(self.async_jobs.heartbeat)
                await asyncio.to_thread(self.async_jobs.cancel_flagged, self.jobs)
                if time.monotonic() - last_sweep > sweep_every:
                    last_sweep = time.monotonic()
                    await asyncio.to_thread(self.async_jobs.sweep)
            except StateStoreError as exc:  # the store is down: say so, keep serving sync requests
                log.error("state store: %s", exc)

    def check_accepting(self) -> None:
        """`ShuttingDown` or `NotReady` unless new work can be taken."""
        if self._draining.is_set():
            raise ShuttingDown()
        if not self._ready.is_set():
            if self.load_error:  # retrying will not help: say why, without Retry-After
                raise NotReady(self.load_error)
            raise NotReady("model is still loading", retry_after=LOADING_RETRY_AFTER)

    # ------------------------------------------------------------------ generation

    async def prepare(self, request: GenerateRequest, **decoded: Image.Image | None) -> GenerationSpec:
        """The request as a spec (images decoded off the event loop); `InvalidField` if unusable."""
        self.check_accepting()
        family = self.engine.family_info
        served_family.check_family_fields(family, request, **decoded)
        spec = await run_in_threadpool(
            build_spec, request, self.limits, default_steps=family.default_steps, **decoded
        )
        serves_loras = self.engine is not None and self.engine.loras is not None
        check_loras(spec.loras, self.library if serves_loras else None)
        return spec

    @property
    def family(self) -> Family | None:
        """What this server serves: the loaded engine's family, or the one its settings name (None: not
        known until the model has loaded)."""
        if self.engine is not None:
            return self.engine.family_info
        return FAMILIES.get(self._configured_family) if self._configured_family else None

    @cached_property
    def _configured_family(self) -> str | None:
        return served_family.configured_family(self.settings.model)

    def check_serves(self, model_id: str) -> Family:
        """`NotFound` saying what is served if it is not `model_id`; `NotReady` while that is unknown."""
        family = self.family
        if family is None:
            self.check_accepting()
            raise NotReady("model is still loading", retry_after=LOADING_RETRY_AFTER)
        if family.model_id != model_id:
            raise served_family.not_served(model_id, family.model_id)
        return family

    # ------------------------------------------------------------------ result links (OpenAI's "url")

    async def link_images(self, result: GenerateResponse, media_type: str, request_id: str) -> list[str]:
        """One unguessable token per image, valid for `--result-ttl` without the API key.

        The images are kept in the state store like an async result (owned by no token, so no poll
        URL reads them), so every replica serves the links.
        """
        tokens = [secrets.token_urlsafe(32) for _ in result.images]
        await asyncio.to_thread(self.async_jobs.store_links, tokens, result, media_type, request_id)
        return tokens

    async def linked_image(self, token: str) -> tuple[bytes, str]:
        """(image bytes, media type); `NotFound` for a wrong or expired link."""
        image = await asyncio.to_thread(self.async_jobs.linked_image, token)
        if image is None:
            raise NotFound("no such image: the link is wrong or has expired")
        return image

    def submit(self, spec: GenerationSpec, *, api: str, request_id: str, timeout: float | None) -> Job:
        self.check_accepting()
        return self.jobs.submit(spec, api=api, request_id=request_id, timeout=timeout)

    async def generate(
        self,
        spec: GenerationSpec,
        *,
        encoding: str,
        request_id: str,
        client_gone: Callable[[], Awaitable[None]],
        log_fields: dict,
    ) -> GenerateResponse:
        """A synchronous generation: wait for the job (a client that goes away, or the deadline,
        cancels it), then encode the OctoAI response body."""
        timeout = self.settings.request_timeout or None
        job = self.submit(spec, api="sync", request_id=request_id, timeout=timeout)
        log_fields["job_id"] = job.id
        try:
            result = await self._wait(job, timeout, client_gone)
        finally:
            log_fields.update(job_fields(job))
        encoded = await self.encode(result, spec, encoding)
        log_fields["encode_ms"] = round(encoded.seconds * 1000, 1)
        self._record_success(job, "sync", len(encoded.response.images))
        return encoded.response

    async def _wait(self, job: Job, timeout: float | None, client_gone) -> GenerationResult:
        outcome = asyncio.wrap_future(job.future)
        # The outcome is read even when nobody waits any longer, so asyncio never warns about it.
        outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
        gone = asyncio.ensure_future(client_gone())
        try:
            done, _ = await asyncio.wait(
                {outcome, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if outcome in done:
            return outcome.result()
        reason = CLIENT_GONE if gone in done else TIMEOUT
        self.jobs.cancel(job, reason)
        raise JobCancelled(reason, started=job.started_at is not None)

    async def encode(self, result: GenerationResult, spec: GenerationSpec, encoding: str) -> Encoded:
        started = time.monotonic()
        response = await run_in_threadpool(octoai_response, result, spec, encoding)
        return Encoded(response, time.monotonic() - started)

    def _record_success(self, job: Job, api: str, images: int) -> None:
        metrics.REQUEST_SECONDS.labels(job.spec.mode, api).observe(time.monotonic() - job.enqueued_at)
        metrics.IMAGES_GENERATED.labels(job.spec.mode).inc(images)

    # ------------------------------------------------------------------ async jobs

    async def check_webhook(self, url: str | None, is_async: bool) -> str | None:
        """The webhook URL to store for a job, after the submit-time checks (DNS, off the event loop)."""
        if url is None:
            return None
        if not is_async:
            message = f"{WEBHOOK_HEADER} needs an async call (X-OctoAI-Async: 1)"
        elif self.webhooks is None:
            message = "this server has no webhook secret (--webhook-secret), so it cannot send webhooks"
        else:
            try:
                return await asyncio.to_thread(check_webhook_url, url, self.settings.webhook_allow_private)
            except WebhookUrlError as exc:
                message = str(exc)
        raise InvalidField(WEBHOOK_HEADER, message, location="header")

    async def start_async(
        self,
        spec: GenerationSpec,
        *,
        encoding: str,
        owner: str | None,
        request_id: str,
        log_fields: dict,
        webhook_url: str | None = None,
        result_url: Callable[[str], str] | None = None,
    ) -> JobRecord:
        """Queue the job and keep its outcome for the poll URL; returns at once.

        `result_url(job_id)` is the absolute result URL that a completed job's webhook carries. The
        record is stored before the job is queued, so even a job that finishes at once has one.
        """
        self.check_accepting()
        self.jobs.check_room()
        job = new_job(spec, api="async", request_id=request_id, timeout=None)
        log_fields["job_id"] = job.id
        if result_url is not None:
            self._result_urls[job.id] = result_url(job.id)
        record = await asyncio.to_thread(
            self.async_jobs.create, job, owner=owner, encoding=encoding, webhook_url=webhook_url
        )
        try:
            self.jobs.enqueue(job)
        except Exception as exc:  # filled up meanwhile: the id was never handed out
            found = problem(exc)
            self._result_urls.pop(job.id, None)
            await asyncio.to_thread(self.async_jobs.fail, job.id, FAILED, found.message, found.status)
            raise
        task = asyncio.ensure_future(self._finish_async(job, encoding))
        self._async_tasks.add(task)
        task.add_done_callback(self._async_tasks.discard)
        return record

    async def _finish_async(self, job: Job, encoding: str) -> None:
        line: dict = {"event": "job", "request_id": job.request_id, "api": "async", "mode": job.spec.mode}
        try:
            result = await asyncio.wrap_future(job.future)
            encoded = await self.encode(result, job.spec, encoding)
            body = encoded.response.model_dump_json().encode()
        except Exception as exc:
            found = problem(exc)
            cancelled = isinstance(exc, JobCancelled) and exc.reason == DELETED
            status = CANCELLED if cancelled else FAILED
            await asyncio.to_thread(self.async_jobs.fail, job.id, status, found.message, found.status)
            metrics.ERRORS.labels(found.kind).inc()
            line.update(status=status, error=found.kind, **job_fields(job))
        else:
            await asyncio.to_thread(self.async_jobs.complete, job.id, body)
            self._record_success(job, "async", len(encoded.response.images))
            line.update(status=COMPLETED, **job_fields(job), encode_ms=round(encoded.seconds * 1000, 1))
        job_log.info(json.dumps(line))

    def _announce(self, job_id: str, status: str, error: str | None) -> None:
        """A job became final (called from a thread, once per job): send its webhook if it asked."""
        response_url = self._result_urls.pop(job_id, None)
        if self.webhooks is None:
            return
        record = self.state.get_job(job_id)
        if record is None or not record.webhook_url:
            return
        if status != COMPLETED:
            response_url = None
        if status == CANCELLED:
            error = None
        self.webhooks.enqueue(job_id, EVENT_TYPES[status], status, response_url, error, record.webhook_url)

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

        return watch_job(self.state, record, final, after=after, previews=previews)

    async def find(self, response_id: str, owner: str | None) -> JobRecord:
        record = await asyncio.to_thread(self.async_jobs.get, response_id, owner)
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
        body = await asyncio.to_thread(self.async_jobs.body, record.id)
        if body is None:
            raise NotFound(f"no async job {response_id!r}: its result expired")
        return body

    async def cancel(self, response_id: str, owner: str | None) -> AsyncView:
        record = await self.find(response_id, owner)
        if record.status in FINAL or not await asyncio.to_thread(self.async_jobs.cancel, record, self.jobs):
            current = await self.find(response_id, owner)
            raise Conflict(f"job already {current.status}")
        return AsyncView(record.id, CANCELLED, record.created_at, f"job cancelled: {DELETED}")

    def _loaded_loras(self) -> LoraCache | None:
        """The LoRA cache uploads are checked against; `NotReady` while the model loads."""
        if not self._ready.is_set():
            raise NotReady("model is still loading; LoRAs are checked against it", retry_after=5)
        return self.engine.loras if self.engine is not None else None


def octoai_response(result: GenerationResult, spec: GenerationSpec, encoding: str) -> GenerateResponse:
    encoded = encode_images(result.images, encoding)
    images = [
        ImageGeneration(image_b64=b64, seed=seed, removed_for_safety=removed, safety_score=score)
        for b64, seed, removed, score in zip(
            encoded, spec.seeds, result.removed_for_safety, result.safety_scores, strict=True
        )
    ]
    return GenerateResponse(images=images, prediction_time_ms=result.seconds * 1000)


def job_fields(job: Job) -> dict:
    return {
        "job_id": job.id,
        "queue_wait_ms": round(job.queue_wait * 1000, 1),
        "gpu_ms": round(job.gpu_seconds * 1000, 1),
    }
