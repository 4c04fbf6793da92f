"""Server-Sent Events on the wire: one frame per progress event, and the keep-alive comment."""

from __future__ import annotations

import json

from octoflux.core.progress import ProgressEvent

# A comment line only, with no blank line after it: it is always written between whole frames, and a
# blank line would make some clients (httpx-sse issue #35, r3labs/sse #163) emit an empty event
# carrying the last id.
KEEPALIVE = b": keep-alive\n"


def _single_line(name: str, value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"an SSE {name} cannot hold a line break or NUL: {value!r}")
    return value


def sse_frame(event: str, data: str, event_id: str | None = None, retry_ms: int | None = None) -> bytes:
    """One SSE frame: `event:`, `id:`, `retry:`, a `data:` line per line of `data`, then a blank line."""
    lines = [f"event: {_single_line('event name', event)}"]
    if event_id is not None:
        lines.append(f"id: {_single_line('id', event_id)}")
    if retry_ms is not None:
        lines.append(f"retry: {int(retry_ms)}")
    # A receiver joins consecutive data lines with "\n", so every line break of the text survives.
    lines.extend(f"data: {line}" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_sse(event: ProgressEvent, event_id: str | None = None, retry_ms: int | None = None) -> bytes:
    """A ProgressEvent as one SSE frame with compact JSON data (always a single data line)."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return sse_frame(event.event, data, event_id, retry_ms)
