"""Live progress of an async job as Server-Sent Events: the events, the ETA, and the wire format.

A stream sends `progress` at each denoising step, `preview` every few steps when asked, then exactly
one final event (`completed`, `failed` or `cancelled`) and ends. Between events a comment line
(`: keep-alive`, see HEARTBEAT) keeps idle proxies from closing the connection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

FINAL_EVENTS = ("completed", "failed", "cancelled")
# A comment line only, with no blank line after it: it is always written between whole frames, and a
# blank line would make some clients (httpx-sse issue #35, r3labs/sse #163) emit an empty event
# carrying the last id.
HEARTBEAT = b": keep-alive\n"


@dataclass(frozen=True)
class ProgressEvent:
    event: str  # progress | preview | completed | failed | cancelled
    data: dict

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS


def progress_event(step: int, steps: int, image_batch: int, eta_s: float | None) -> ProgressEvent:
    eta = None if eta_s is None else round(max(0.0, eta_s), 1)
    return ProgressEvent("progress", {"step": step, "steps": steps, "image_batch": image_batch, "eta_s": eta})


def preview_event(step: int, steps: int, image_batch: int, image_data_url: str) -> ProgressEvent:
    return ProgressEvent(
        "preview", {"step": step, "steps": steps, "image_batch": image_batch, "image": image_data_url}
    )


def completed_event(response_url: str) -> ProgressEvent:
    return ProgressEvent("completed", {"status": "completed", "response_url": response_url})


def failed_event(error: str) -> ProgressEvent:
    return ProgressEvent("failed", {"status": "failed", "error": error})


def cancelled_event() -> ProgressEvent:
    return ProgressEvent("cancelled", {"status": "cancelled"})


def final_event(status: str, response_url: str | None = None, error: str | None = None) -> ProgressEvent:
    """The closing event for a finished job's status (what a late watcher gets at once)."""
    if status == "completed":
        return completed_event(response_url or "")
    if status == "failed":
        return failed_event(error or "generation failed")
    if status == "cancelled":
        return cancelled_event()
    raise ValueError(f"job status {status!r} is not final")


@dataclass
class StepClock:
    """Measures the time between denoising steps of one job and turns it into an ETA.

    The first step also carries prompt encoding and warm-up, so only intervals between consecutive
    steps of the same batch count; the VAE decode at the end is not in the estimate.
    """

    durations: list[float] = field(default_factory=list)
    _last: tuple[int, int, float] | None = None  # (image_batch, step, monotonic time)

    def step(self, step: int, image_batch: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        last = self._last
        if last is not None and last[0] == image_batch and step == last[1] + 1:
            self.durations.append(now - last[2])
        self._last = (image_batch, step, now)

    @property
    def step_seconds(self) -> float | None:
        recent = self.durations[-8:]
        return sum(recent) / len(recent) if recent else None

    def eta_s(self, step: int, steps: int, image_batch: int, batches: int) -> float | None:
        """Seconds left: the steps left in this batch and every later batch, at the measured pace."""
        if self.step_seconds is None:
            return None
        remaining = (steps - step) + (batches - image_batch - 1) * steps
        return remaining * self.step_seconds


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
