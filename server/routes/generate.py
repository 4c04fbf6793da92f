"""`POST /generate/flux-dev` (sync and async) and the async poll/result/cancel endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipelines.engine import GenerationResult, GenerationSpec
from pipelines.loras import LoraError, LoraLibrary, lora_name
from server import jobs, metrics
from server.auth import require_bearer
from server.codec import ImageDecodeError, decode_image, encode_images, fit
from server.errors import ServiceUnavailable, invalid, job_failure
from server.jobs import Job, JobCancelled, QueueFull, ShuttingDown
from server.results import CANCELLED, COMPLETED, FAILED, FINAL, AsyncRecord, owner_key
from server.schemas import (
    DEFAULT_GUIDANCE,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_SEED,
    SUPPORTED_RESOLUTIONS,
    AsyncAccepted,
    AsyncStatus,
    ErrorDetail,
    GenerateRequest,
    GenerateResponse,
    ImageGeneration,
    nearest_resolution,
    resolution_error,
)
from server.settings import Settings

router = APIRouter()
log = logging.getLogger(__name__)
job_log = logging.getLogger("octoflux.access")
ASYNC_TRUE = {"1", "true", "yes"}


def resolve_seeds(seed: int | list[int | None] | None, num_images: int) -> list[int]:
    """An int gives seed, seed+1, ...; a list gives one seed per image; gaps are drawn at random."""
    if isinstance(seed, int):
        return [(seed - 1 + i) % MAX_SEED + 1 for i in range(num_images)]
    if seed is None:
        seed = [None] * num_images
    if len(seed) != num_images:
        raise invalid("seed", f"seed list has {len(seed)} entries but num_images is {num_images}")
    return [s if s is not None else secrets.randbelow(MAX_SEED) + 1 for s in seed]


def resolve_size(req: GenerateRequest, init_aspect: float | None) -> tuple[int, int]:
    if req.width is not None and req.height is not None:
        size = (req.width, req.height)
    elif init_aspect is None:
        size = (req.width or DEFAULT_SIZE, req.height or DEFAULT_SIZE)
    else:
        size = nearest_resolution(init_aspect, req.width, req.height)
        if size is None:
            field = "width" if req.width is not None else "height"
            raise invalid(field, resolution_error(req.width, req.height))
    if size not in SUPPORTED_RESOLUTIONS:
        raise invalid(
            "width" if size[0] not in {w for w, _ in SUPPORTED_RESOLUTIONS} else "height",
            resolution_error(*size),
        )
    return size


def build_spec(req: GenerateRequest, settings: Settings) -> GenerationSpec:
    """Decode images and apply defaults; raises a 422 naming the field for anything unusable."""
    if req.mask_image is not None and req.init_image is None:
        raise invalid("mask_image", "mask_image needs init_image (inpainting edits an existing image)")
    limits = dict(max_bytes=int(settings.max_image_mb * 2**20), max_pixels=settings.max_image_pixels)
    try:
        init = decode_image(req.init_image, "init_image", **limits) if req.init_image is not None else None
        mask = decode_image(req.mask_image, "mask_image", **limits) if req.mask_image is not None else None
    except ImageDecodeError as exc:
        raise invalid(exc.field, str(exc)) from None
    if init is not None and mask is not None:
        init_aspect, mask_aspect = init.width / init.height, mask.width / mask.height
        if abs(init_aspect / mask_aspect - 1) > 0.01:
            raise invalid(
                "mask_image",
                f"mask_image is {mask.width}x{mask.height} but init_image is {init.width}x{init.height}: "
                "their aspect ratios must match",
            )
    width, height = resolve_size(req, init.width / init.height if init is not None else None)
    num_images = req.num_images or 1
    strength = req.strength or (DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH)
    return GenerationSpec(
        prompt=req.prompt,
        width=width,
        height=height,
        steps=req.steps or DEFAULT_STEPS,
        guidance=req.cfg_scale if req.cfg_scale is not None else DEFAULT_GUIDANCE,
        seeds=resolve_seeds(req.seed, num_images),
        init_image=fit(init, width, height) if init is not None else None,
        mask_image=fit(mask, width, height).convert("L") if mask is not None else None,
        strength=strength,
        loras={name: 1.0 if weight is None else weight for name, weight in (req.loras or {}).items()},
    )


def lora_invalid(exc: LoraError):
    """A 422 on `loras` whose message names the LoRA."""
    message = str(exc) if repr(exc.name) in str(exc) else f"LoRA {exc.name!r}: {exc}"
    return invalid("loras", message)


def check_loras(loras: dict[str, float], library: LoraLibrary | None) -> None:
    """A 422 naming the first LoRA that has no file (or a bad name, or is named twice)."""
    seen: dict[str, str] = {}
    for ref in loras:
        if library is None:
            raise invalid("loras", f"unknown LoRA {ref!r}: this server serves no LoRAs")
        try:
            library.resolve(ref)
        except LoraError as exc:
            raise lora_invalid(exc) from None
        name = lora_name(ref)
        if name in seen:
            raise invalid("loras", f"LoRA {name!r} is named twice ({seen[name]!r} and {ref!r})")
        seen[name] = ref


async def wait_for_job(request: Request, job: Job, timeout: float | None) -> GenerationResult:
    """Wait for the worker. A client that goes away, or a deadline that passes, cancels the job."""
    queue: jobs.JobQueue = request.app.state.jobs
    outcome = asyncio.wrap_future(job.future)
    # The outcome is read even when nobody waits any longer, so asyncio never warns about it.
    outcome.add_done_callback(lambda f: f.cancelled() or f.exception())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({outcome, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if outcome in done:
        return outcome.result()
    reason = jobs.CLIENT_GONE if gone in done else jobs.TIMEOUT
    queue.cancel(job, reason)
    raise JobCancelled(reason, started=job.started_at is not None)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_response(result: GenerationResult, spec: GenerationSpec, encoding: str) -> GenerateResponse:
    encoded = encode_images(result.images, encoding)
    images = [
        ImageGeneration(image_b64=b64, seed=seed) for b64, seed in zip(encoded, spec.seeds, strict=True)
    ]
    return GenerateResponse(images=images, prediction_time_ms=result.seconds * 1000)


def job_fields(job: Job, encode_seconds: float | None = None) -> dict:
    fields = {
        "job_id": job.id,
        "queue_wait_ms": round(job.queue_wait * 1000, 1),
        "gpu_ms": round(job.gpu_seconds * 1000, 1),
    }
    if encode_seconds is not None:
        fields["encode_ms"] = round(encode_seconds * 1000, 1)
    return fields


def absolute_url(request: Request, name: str, **params: str) -> str:
    public = request.app.state.settings.public_url
    if public:
        return public.rstrip("/") + request.app.url_path_for(name, **params)
    return str(request.url_for(name, **params))


def request_owner(request: Request) -> str | None:
    """Who may read an async result: the bearer token's hash when auth is on, else anyone."""
    if not request.app.state.settings.api_key_list:
        return None
    return owner_key(request.headers.get("authorization", "").partition(" ")[2].strip())


def error_response(request: Request, status: int, kind: str, detail: str, headers=None) -> JSONResponse:
    request.state.log["error"] = kind
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


GENERATE_RESPONSES = {
    202: {"model": AsyncAccepted, "description": "Accepted for async inference (`X-OctoAI-Async: 1`)"},
    401: {"model": ErrorDetail, "description": "Missing or invalid bearer token"},
    413: {"model": ErrorDetail, "description": "Request body over the size limit"},
    415: {"model": ErrorDetail, "description": "Body is not application/json"},
    429: {"model": ErrorDetail, "description": "Queue full; retry after the `Retry-After` seconds"},
    500: {"model": ErrorDetail, "description": "The pipeline failed on this job"},
    503: {"model": ErrorDetail, "description": "Loading, shutting down, or out of GPU memory"},
    504: {"model": ErrorDetail, "description": "The request ran past `--request-timeout`"},
}


@router.post(
    "/generate/flux-dev",
    response_model=GenerateResponse,
    dependencies=[Depends(require_bearer)],
    responses=GENERATE_RESPONSES,
    summary="Generate images with FLUX.1-dev (text-to-image, image-to-image, inpainting)",
)
async def generate_flux_dev(
    body: GenerateRequest,
    request: Request,
    x_octoai_async: Annotated[
        str | None, Header(description="`1`: return at once with a poll URL (async inference)")
    ] = None,
):
    state = request.app.state
    settings = state.settings
    fields: dict = request.state.log
    is_async = (x_octoai_async or "").strip().lower() in ASYNC_TRUE
    fields["api"] = "async" if is_async else "sync"
    if state.draining.is_set():
        return error_response(request, 503, "shutting_down", "server is shutting down; retry")
    if not state.ready.is_set():
        if state.load_error:  # retrying will not help: say why, without Retry-After
            raise ServiceUnavailable(state.load_error)
        raise ServiceUnavailable("model is still loading", retry_after=5)
    spec = await run_in_threadpool(build_spec, body, settings)
    check_loras(spec.loras, state.lora_library if getattr(state.engine, "loras", None) else None)
    fields.update(
        mode=spec.mode, width=spec.width, height=spec.height, steps=spec.steps, images=len(spec.seeds)
    )
    if body.log_prompt:
        fields["prompt"] = spec.prompt
    encoding = body.image_encoding or "png"
    try:
        job = state.jobs.submit(
            spec,
            api=fields["api"],
            request_id=request.state.request_id,
            timeout=None if is_async else settings.request_timeout or None,
        )
    except QueueFull as full:
        return error_response(
            request,
            429,
            "queue_full",
            f"server busy: {state.jobs.depth} jobs queued; retry in {full.retry_after}s",
            headers={"Retry-After": str(full.retry_after)},
        )
    except ShuttingDown:
        return error_response(request, 503, "shutting_down", "server is shutting down; retry")
    fields["job_id"] = job.id
    if is_async:
        return accept_async(request, job, encoding)
    try:
        result = await wait_for_job(request, job, settings.request_timeout or None)
    except LoraError as exc:  # deleted since the check above, or the file is unusable
        raise lora_invalid(exc) from None
    except (JobCancelled, ShuttingDown) as exc:
        status, kind, detail = job_failure(exc)
        return error_response(request, status, kind, detail)
    finally:
        fields.update(job_fields(job))
    encode_started = time.monotonic()
    response = await run_in_threadpool(build_response, result, spec, encoding)
    fields.update(job_fields(job, time.monotonic() - encode_started))
    metrics.REQUEST_SECONDS.labels(spec.mode, "sync").observe(time.monotonic() - job.enqueued_at)
    metrics.IMAGES_GENERATED.labels(spec.mode).inc(len(response.images))
    return response


def accept_async(request: Request, job: Job, encoding: str) -> JSONResponse:
    state = request.app.state
    record = state.results.create(job, request_owner(request))
    task = asyncio.ensure_future(finish_async(state, record, job, encoding))
    state.async_tasks.add(task)
    task.add_done_callback(state.async_tasks.discard)
    accepted = AsyncAccepted(
        response_id=job.id, poll_url=absolute_url(request, "poll_response", response_id=job.id)
    )
    return JSONResponse(status_code=202, content=accepted.model_dump())


async def finish_async(state, record: AsyncRecord, job: Job, encoding: str) -> None:
    """Wait for an async job, then keep its encoded body (or its failure) for the poll URL."""
    line: dict = {"event": "job", "request_id": job.request_id, "api": "async", "mode": job.spec.mode}
    encode_seconds = None
    try:
        result = await asyncio.wrap_future(job.future)
        encode_started = time.monotonic()
        response = await run_in_threadpool(build_response, result, job.spec, encoding)
        encode_seconds = time.monotonic() - encode_started
        body = response.model_dump_json().encode()
    except Exception as exc:
        status, kind, detail = job_failure(exc)
        cancelled = isinstance(exc, JobCancelled) and exc.reason == jobs.DELETED
        state.results.fail(record, CANCELLED if cancelled else FAILED, detail, status)
        metrics.ERRORS.labels(kind).inc()
        line.update(status=record.status, error=kind)
    else:
        state.results.complete(record, body)
        metrics.REQUEST_SECONDS.labels(job.spec.mode, "async").observe(time.monotonic() - job.enqueued_at)
        metrics.IMAGES_GENERATED.labels(job.spec.mode).inc(len(response.images))
        line.update(status=COMPLETED)
    line.update(job_fields(job, encode_seconds))
    job_log.info(json.dumps(line))


ASYNC_RESPONSES = {
    401: {"model": ErrorDetail, "description": "Missing or invalid bearer token"},
    404: {"model": ErrorDetail, "description": "No such job for this token, or its result expired"},
}


def find_record(request: Request, response_id: str) -> AsyncRecord | None:
    return request.app.state.results.get(response_id, request_owner(request))


def not_found(request: Request, response_id: str) -> JSONResponse:
    detail = f"no async job {response_id!r}: unknown, expired, or created with another token"
    return error_response(request, 404, "not_found", detail)


@router.get(
    "/v1/responses/{response_id}",
    name="poll_response",
    response_model=AsyncStatus,
    response_model_exclude_none=True,
    dependencies=[Depends(require_bearer)],
    responses=ASYNC_RESPONSES,
    summary="Status of an async generation; `response_url` once completed",
)
async def poll_response(response_id: str, request: Request):
    record = find_record(request, response_id)
    if record is None:
        return not_found(request, response_id)
    status = record.current_status()
    return AsyncStatus(
        response_id=record.id,
        status=status,
        created_at=record.created_at,
        error=record.error,
        response_url=(
            absolute_url(request, "response_result", response_id=record.id) if status == COMPLETED else None
        ),
    )


@router.get(
    "/v1/responses/{response_id}/result",
    name="response_result",
    response_model=GenerateResponse,
    dependencies=[Depends(require_bearer)],
    responses={**ASYNC_RESPONSES, 409: {"model": ErrorDetail, "description": "Not completed"}},
    summary="The body a synchronous call would have returned",
)
async def response_result(response_id: str, request: Request):
    record = find_record(request, response_id)
    if record is None:
        return not_found(request, response_id)
    if record.status != COMPLETED:
        status = record.current_status()
        return error_response(
            request, 409, "not_completed", f"job is {status}: {record.error or 'no result yet'}"
        )
    # A body in memory is taken here, on the event loop that owns the store; only a spilled one
    # is read in a thread, and one swept meanwhile reads as gone.
    body = (
        record.body
        if record.body is not None
        else await run_in_threadpool(request.app.state.results.read, record)
    )
    if body is None:
        return not_found(request, response_id)
    return Response(content=body, media_type="application/json")


@router.delete(
    "/v1/responses/{response_id}",
    response_model=AsyncStatus,
    response_model_exclude_none=True,
    dependencies=[Depends(require_bearer)],
    responses={**ASYNC_RESPONSES, 409: {"model": ErrorDetail, "description": "Already finished"}},
    summary="Cancel a pending or running async generation",
)
async def cancel_response(response_id: str, request: Request):
    record = find_record(request, response_id)
    if record is None:
        return not_found(request, response_id)
    if record.status in FINAL:
        return error_response(request, 409, "conflict", f"job already {record.status}")
    job = record.job
    request.app.state.results.fail(record, CANCELLED, f"job cancelled: {jobs.DELETED}", 409)
    if job is not None:
        request.app.state.jobs.cancel(job, jobs.DELETED)
    return AsyncStatus(
        response_id=record.id, status=CANCELLED, created_at=record.created_at, error=record.error
    )
