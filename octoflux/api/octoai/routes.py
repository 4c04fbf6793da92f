"""OctoAI's dialect: `POST /generate/flux-dev` and `/generate/flux-schnell`, and in OctoAI's style
`/generate/flux-kontext-dev` and `/generate/flux-fill-dev` (sync and async; a server answers the routes of
the models it serves) and the async poll/result/cancel URLs."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from octoflux.api.common.auth import require_bearer
from octoflux.api.common.deps import Service, absolute_url, caller, header_text, log_spec
from octoflux.api.common.owners import asset_space
from octoflux.api.octoai import convert
from octoflux.api.octoai.protocol import (
    AsyncAccepted,
    AsyncStatus,
    ErrorDetail,
    FillRequest,
    GenerateRequest,
    GenerateResponse,
    KontextRequest,
)
from octoflux.core import renderers
from octoflux.core.async_jobs import AsyncView, Idempotency
from octoflux.core.errors import InvalidField, NotFound
from octoflux.core.service import GenerationService
from octoflux.pipelines.family import FLUX_DEV, FLUX_FILL_DEV, FLUX_KONTEXT_DEV, FLUX_SCHNELL
from octoflux.webhooks.urls import WEBHOOK_HEADER

router = APIRouter(dependencies=[Depends(require_bearer)])
DIALECT = "octoai"
IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY = "Idempotency-Key", 255
# A finished async job's body, rendered by whichever process ran it (octoflux/core/renderers.py).
renderers.register(DIALECT, lambda generated, options: convert.response_body(generated, options["encoding"]))
ASYNC_TRUE = {"1", "true", "yes"}
AsyncHeader = Annotated[
    str | None, Header(description="`1`: return at once with a poll URL (async inference)")
]
WebhookHeader = Annotated[
    str | None,
    Header(description="async only: an http(s) URL to POST a signed message to when the job ends"),
]
IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        description="async only: the same key (same API key, same body) within --result-ttl returns "
        "the same job instead of a second one; the key with another body is a 409",
    ),
]


def _errors(*codes: int, **described: str) -> dict:
    text = {
        401: "Missing or invalid bearer token",
        404: "No such job for this token, or its result expired",
        409: "Not in a state that allows this",
        413: "Request body over the size limit",
        415: "Body is not application/json",
        429: "Queue full; retry after the `Retry-After` seconds",
        500: "The pipeline failed on this job",
        503: "Loading, shutting down, or out of GPU memory",
        504: "The request ran past `--request-timeout`",
    }
    return {
        code: {"model": ErrorDetail, "description": described.get(f"s{code}", text[code])} for code in codes
    }


def serves(model_id: str):
    """A dependency: 404 naming the served models unless this server serves `model_id` (checked before the
    body, so the answer does not depend on it); the model's family is left in `request.state.family`."""

    def check(request: Request, service: Service) -> None:
        served = service.runtime.served_families()
        if model_id not in served:
            routes = ", ".join(f"POST /generate/{served_id}" for served_id in served)
            raise NotFound(
                f"this server serves {', '.join(served)} ({routes}), not {model_id}; "
                f"start one with a {model_id} checkpoint (--model {model_id}=PATH) to use this route"
            )
        request.state.family = served[model_id]

    return Depends(check)


GENERATE_RESPONSES: dict = {
    202: {"model": AsyncAccepted, "description": "Accepted for async inference (`X-OctoAI-Async: 1`)"},
    **_errors(401, 404, 413, 415, 429, 500, 503, 504, s404="This server does not serve this model"),
    422: {"description": "A bad field, or an `X-OctoFlux-Webhook-Url` the server will not call"},
}


@router.post(
    "/generate/flux-dev",
    response_model=GenerateResponse,
    responses=GENERATE_RESPONSES,
    dependencies=[serves(FLUX_DEV)],
    summary="Generate images with FLUX.1-dev (text-to-image, image-to-image, inpainting)",
)
async def generate_flux_dev(
    body: GenerateRequest,
    request: Request,
    service: Service,
    x_octoai_async: AsyncHeader = None,
    x_octoflux_webhook_url: WebhookHeader = None,
    idempotency_key: IdempotencyHeader = None,
):
    return await _generate(body, request, service, x_octoai_async, x_octoflux_webhook_url, idempotency_key)


@router.post(
    "/generate/flux-schnell",
    response_model=GenerateResponse,
    responses=GENERATE_RESPONSES,
    dependencies=[serves(FLUX_SCHNELL)],
    summary="Generate images with FLUX.1-schnell (text-to-image only; 4 steps by default)",
)
async def generate_flux_schnell(
    body: GenerateRequest,
    request: Request,
    service: Service,
    x_octoai_async: AsyncHeader = None,
    x_octoflux_webhook_url: WebhookHeader = None,
    idempotency_key: IdempotencyHeader = None,
):
    return await _generate(body, request, service, x_octoai_async, x_octoflux_webhook_url, idempotency_key)


@router.post(
    "/generate/flux-kontext-dev",
    response_model=GenerateResponse,
    responses=GENERATE_RESPONSES,
    dependencies=[serves(FLUX_KONTEXT_DEV)],
    summary="Edit an image by instruction with FLUX.1 Kontext [dev] (init_image required)",
)
async def generate_flux_kontext_dev(
    body: KontextRequest,
    request: Request,
    service: Service,
    x_octoai_async: AsyncHeader = None,
    x_octoflux_webhook_url: WebhookHeader = None,
    idempotency_key: IdempotencyHeader = None,
):
    return await _generate(body, request, service, x_octoai_async, x_octoflux_webhook_url, idempotency_key)


@router.post(
    "/generate/flux-fill-dev",
    response_model=GenerateResponse,
    responses=GENERATE_RESPONSES,
    dependencies=[serves(FLUX_FILL_DEV)],
    summary="Inpaint (mask_image) or outpaint (outpaint) an image with FLUX.1 Fill [dev]",
)
async def generate_flux_fill_dev(
    body: FillRequest,
    request: Request,
    service: Service,
    x_octoai_async: AsyncHeader = None,
    x_octoflux_webhook_url: WebhookHeader = None,
    idempotency_key: IdempotencyHeader = None,
):
    return await _generate(body, request, service, x_octoai_async, x_octoflux_webhook_url, idempotency_key)


async def _generate(
    body: GenerateRequest,
    request: Request,
    service: GenerationService,
    async_header,
    webhook_header,
    idempotency_header=None,
):
    """Both families' route: sync answers the body, async (`X-OctoAI-Async: 1`) a poll URL."""
    fields: dict = request.state.log
    is_async = (async_header or "").strip().lower() in ASYNC_TRUE
    who = caller(request, api="async" if is_async else "sync")
    try:
        idempotency = None
        if is_async:  # a retry gets its job back before anything else is checked
            webhook_text = (header_text(webhook_header) or "").strip() or None
            idempotency = await _idempotency(request, header_text(idempotency_header), webhook_text)
            if idempotency is not None and (held := await service.async_jobs.held(who, idempotency)):
                return _accepted(request, held.id)
        webhook_url = await _webhook_url(service, header_text(webhook_header), is_async)
        image_request = await run_in_threadpool(convert.image_request, body, service.limits)
        spec = await service.generation.prepare(
            image_request, family=request.state.family, space=asset_space(request)
        )
        log_spec(fields, spec, with_prompt=bool(body.log_prompt))
        encoding = body.image_encoding or "png"

        def render(generated) -> bytes:
            return convert.response_body(generated, encoding)

        if not is_async:
            content = await service.generation.generate(spec, who, render)
            return Response(content=content, media_type="application/json")
        record = await service.async_jobs.start(
            spec,
            who,
            DIALECT,
            {"encoding": encoding},
            webhook_url=webhook_url,
            result_url=lambda job_id: absolute_url(request, "response_result", response_id=job_id),
            idempotency=idempotency,
        )
        return _accepted(request, record.id)
    finally:
        fields.update(api=who.api, **who.trace.fields())


def _accepted(request: Request, job_id: str) -> JSONResponse:
    poll_url = absolute_url(request, "poll_response", response_id=job_id)
    accepted = AsyncAccepted(response_id=job_id, poll_url=poll_url)
    return JSONResponse(status_code=202, content=accepted.model_dump())


async def _webhook_url(service: GenerationService, url: str | None, is_async: bool) -> str | None:
    if url is None:
        return None
    if not is_async:
        raise InvalidField(
            WEBHOOK_HEADER, f"{WEBHOOK_HEADER} needs an async call (X-OctoAI-Async: 1)", "header"
        )
    return await service.async_jobs.check_webhook(url, WEBHOOK_HEADER)


async def _idempotency(request: Request, key: str | None, webhook_url: str | None) -> Idempotency | None:
    """The key with a digest of what it came with: the route, the body as sent, the webhook URL."""
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidField(IDEMPOTENCY_HEADER, f"give 1 to {MAX_IDEMPOTENCY_KEY} characters", "header")
    digest = hashlib.sha256(f"{request.url.path}\n{webhook_url or ''}\n".encode())
    digest.update(await request.body())
    return Idempotency(key, digest.hexdigest())


def _status(request: Request, view: AsyncView) -> AsyncStatus:
    completed = view.status == "completed"
    url = absolute_url(request, "response_result", response_id=view.response_id) if completed else None
    return AsyncStatus(
        response_id=view.response_id,
        status=view.status,
        created_at=view.created_at,
        error=view.error,
        response_url=url,
    )


@router.get(
    "/v1/responses/{response_id}",
    name="poll_response",
    response_model=AsyncStatus,
    response_model_exclude_none=True,
    responses=_errors(401, 404),
    summary="Status of an async generation; `response_url` once completed",
)
async def poll_response(response_id: str, request: Request, service: Service):
    return _status(request, await service.async_jobs.poll(response_id, caller(request).owner))


@router.get(
    "/v1/responses/{response_id}/result",
    name="response_result",
    response_model=GenerateResponse,
    responses=_errors(401, 404, 409, s409="Not completed"),
    summary="The body a synchronous call would have returned",
)
async def response_result(response_id: str, request: Request, service: Service):
    body = await service.async_jobs.result(response_id, caller(request).owner)
    return Response(content=body, media_type="application/json")


@router.delete(
    "/v1/responses/{response_id}",
    response_model=AsyncStatus,
    response_model_exclude_none=True,
    responses=_errors(401, 404, 409, s409="Already finished"),
    summary="Cancel a pending or running async generation",
)
async def cancel_response(response_id: str, request: Request, service: Service):
    return _status(request, await service.async_jobs.cancel_by_owner(response_id, caller(request).owner))
