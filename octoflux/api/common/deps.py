"""What every route needs from a request: the service, who is asking, and absolute URLs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from octoflux.api.common.owners import request_owner, request_tenant
from octoflux.core.request import Caller
from octoflux.core.service import GenerationService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


Service = Annotated[GenerationService, Depends(get_service)]


def caller(request: Request, api: str = "sync") -> Caller:
    """What the core needs to know of who asks, taken from the request once, on the way down."""
    tenant = request_tenant(request)
    quotas = request.app.state.service.quotas
    return Caller(
        request_id=request.state.request_id,
        api=api,
        owner=request_owner(request),
        tenant=tenant,
        quota=quotas.of(tenant) if tenant is not None else None,
        client_gone=client_gone(request),
    )


def header_text(value: str | None) -> str | None:
    """A header as its sender wrote it: Starlette decodes header bytes as latin-1, so a UTF-8 value
    (a URL with an internationalized host) is read back as UTF-8 when it is one."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def absolute_url(request: Request, name: str, **params: str) -> str:
    public = request.app.state.service.settings.public_url
    if public:
        return public.rstrip("/") + request.app.url_path_for(name, **params)
    return str(request.url_for(name, **params))


def client_gone(request: Request):
    """An awaitable factory that returns when the client disconnects (after the body was read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def log_spec(fields: dict, spec, with_prompt: bool) -> None:
    """What the request's log line says of the work; the prompt only when the client asked."""
    fields.update(
        model=spec.model,
        mode=spec.mode,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        images=len(spec.seeds),
    )
    if with_prompt:
        fields["prompt"] = spec.prompt
