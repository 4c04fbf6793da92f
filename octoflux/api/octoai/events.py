"""`GET /v1/responses/{id}/events`: an async job's live progress as Server-Sent Events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from octoflux.api.common.auth import require_bearer
from octoflux.api.common.deps import Service, absolute_url, request_owner
from octoflux.api.octoai.protocol import ErrorDetail
from octoflux.core.progress import HEARTBEAT, encode_sse
from octoflux.core.step_events import Watched

router = APIRouter(dependencies=[Depends(require_bearer)])
HEARTBEAT_EVERY_S = 10.0
PreviewQuery = Annotated[bool, Query(description="`1`: add `preview` events (a small JPEG) every few steps")]


@router.get(
    "/v1/responses/{response_id}/events",
    name="response_events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "progress, preview, then one final event"},
        401: {"model": ErrorDetail, "description": "Missing or invalid bearer token"},
        404: {"model": ErrorDetail, "description": "No such job for this token, or it expired"},
    },
    summary="Live progress of an async generation (Server-Sent Events)",
)
async def response_events(
    response_id: str,
    request: Request,
    service: Service,
    preview: PreviewQuery = False,
    last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None,
):
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    watched = await service.events(
        response_id,
        request_owner(request),
        response_url=absolute_url(request, "response_result", response_id=response_id),
        after=after,
        previews=preview,
    )
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
    return StreamingResponse(_frames(watched), media_type="text/event-stream", headers=headers)


async def _frames(watched: AsyncIterator[Watched]) -> AsyncIterator[bytes]:
    """SSE frames, with a heartbeat comment whenever nothing was sent for HEARTBEAT_EVERY_S."""
    last_sent = time.monotonic()
    async for item in watched:
        if item is None:
            if time.monotonic() - last_sent < HEARTBEAT_EVERY_S:
                continue
            frame = HEARTBEAT
        else:
            seq, event = item
            frame = encode_sse(event, None if seq is None else str(seq))
        last_sent = time.monotonic()
        yield frame
