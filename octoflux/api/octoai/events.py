"""`GET /v1/responses/{id}/events`: an async job's live progress as Server-Sent Events."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from octoflux.api.common.auth import require_bearer
from octoflux.api.common.deps import Service, absolute_url, request_owner
from octoflux.api.octoai.protocol import ErrorDetail
from octoflux.api.octoai.sse import KEEPALIVE, encode_sse
from octoflux.core.errors import STATE_RETRY_AFTER_S, InvalidField, problem
from octoflux.core.progress import Watched
from octoflux.state.store import StateStoreError

router = APIRouter(dependencies=[Depends(require_bearer)])
# A stream that sent nothing for this long gets a keep-alive comment, so idle proxies keep it open.
KEEPALIVE_EVERY_S = 10.0
# The ids this stream sends are the store's sequence numbers: ASCII digits, far below 10**18.
EVENT_ID = re.compile(r"[0-9]{1,18}")
PreviewQuery = Annotated[bool, Query(description="`1`: add `preview` events (a small JPEG) every few steps")]
LastEventIdHeader = Annotated[
    str | None, Header(description="resume after this event id (the `id:` of an event this stream sent)")
]


@router.get(
    "/v1/responses/{response_id}/events",
    name="response_events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "progress, preview, then one final event"},
        401: {"model": ErrorDetail, "description": "Missing or invalid bearer token"},
        404: {"model": ErrorDetail, "description": "No such job for this token, or it expired"},
        422: {"description": "Last-Event-ID is not an event id this stream sends"},
    },
    summary="Live progress of an async generation (Server-Sent Events)",
)
async def response_events(
    response_id: str,
    request: Request,
    service: Service,
    preview: PreviewQuery = False,
    last_event_id: LastEventIdHeader = None,
):
    watched = await service.events(
        response_id,
        request_owner(request),
        response_url=absolute_url(request, "response_result", response_id=response_id),
        after=resume_after(last_event_id),
        previews=preview,
    )
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
    return StreamingResponse(_frames(watched), media_type="text/event-stream", headers=headers)


def resume_after(last_event_id: str | None) -> int:
    """The sequence number a reconnecting client last received; 0 when it sent none."""
    if not last_event_id:
        return 0
    if EVENT_ID.fullmatch(last_event_id) is None:
        shown = (
            last_event_id
            if len(last_event_id) <= 40
            else f"{last_event_id[:40]}... ({len(last_event_id)} chars)"
        )
        raise InvalidField(
            "last-event-id",
            f"Last-Event-ID must be an event id this stream sent (digits), not {shown!r}",
            "header",
        )
    return int(last_event_id)


async def _frames(watched: AsyncIterator[Watched]) -> AsyncIterator[bytes]:
    """SSE frames, one chunk per batch; a keep-alive comment after KEEPALIVE_EVERY_S of silence.

    A state store that fails mid-stream ends it with a `retry:` field: the client's EventSource comes
    back after STATE_RETRY_AFTER_S with its Last-Event-ID, and gets a 503 until the store is back.
    """
    last_sent = time.monotonic()
    async with aclosing(watched):  # closing the stream releases the watch's place in the job's feed
        try:
            async for batch in watched:
                if batch:
                    chunk = b"".join(
                        encode_sse(event, None if seq is None else str(seq)) for seq, event in batch
                    )
                elif time.monotonic() - last_sent >= KEEPALIVE_EVERY_S:
                    chunk = KEEPALIVE
                else:
                    continue
                last_sent = time.monotonic()
                yield chunk
        except StateStoreError as exc:
            problem(exc)  # logs it (at most once per interval)
            yield f"retry: {STATE_RETRY_AFTER_S * 1000}\n\n".encode()
