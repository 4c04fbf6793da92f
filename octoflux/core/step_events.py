"""What an async job's worker writes to the state store at each denoising step, and how watchers read it.

Progress travels through the state store (`append_event` / `events_after`), so a watcher on any
replica follows a job that runs on another. The worker appends a `progress` event at every step
and, every `PREVIEW_EVERY` steps, a `preview` event; the final event is never logged: a watcher
reads it from the job record once the job is final, so it always matches what the poll URL says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from octoflux.core.progress import ProgressEvent, StepClock, preview_event, progress_event
from octoflux.pipelines.engine import StepEvent
from octoflux.pipelines.preview import preview_data_url
from octoflux.state.records import FINAL, JobRecord
from octoflux.state.store import StateStore

log = logging.getLogger(__name__)

# A preview costs 0.9-1.6 ms at the median on one CPU thread (benchmarks/progress.py), so every async
# job gets one every 4th step whether or not anyone watches (under 0.5 ms per step on average; a
# 28-step job stores 7 of about 20 KB); `?preview=1` only decides whether a stream forwards them.
PREVIEW_EVERY = 4
# How often a watcher reads the store for new events: at most this late behind the worker.
POLL_S = 0.15

# What a watcher yields: (sequence number, event) for a logged event, (None, event) for the final
# one, None after a poll that found nothing (the stream may send a heartbeat then).
Watched = tuple[int | None, ProgressEvent] | None


def stored_event(event: ProgressEvent) -> dict:
    return {"event": event.event, "data": event.data}


def loaded_event(stored: dict) -> ProgressEvent:
    return ProgressEvent(stored["event"], stored["data"])


class StepPublisher:
    """A job's step listener: runs on the worker thread, so it does one store write per event and
    never raises (a store that went away costs the progress, not the generation)."""

    def __init__(self, store: StateStore, job_id: str, preview_every: int = PREVIEW_EVERY):
        self.store = store
        self.job_id = job_id
        self.preview_every = preview_every
        self.clock = StepClock()
        self._failed = False

    def __call__(self, step: StepEvent) -> None:
        self.clock.step(step.step, step.image_batch)
        eta = self.clock.eta_s(step.step, step.steps, step.image_batch, step.batches)
        self._append(progress_event(step.step, step.steps, step.image_batch, eta))
        if self.preview_every and step.step % self.preview_every == 0:
            image = preview_data_url(step.latents, step.width, step.height)
            self._append(preview_event(step.step, step.steps, step.image_batch, image))

    def _append(self, event: ProgressEvent) -> None:
        try:
            self.store.append_event(self.job_id, stored_event(event))
        except Exception as exc:  # RecordNotFound, StateStoreError: logged once per job
            if not self._failed:
                self._failed = True
                log.warning("progress events of job %s are not stored: %r", self.job_id, exc)


async def watch_job(
    store: StateStore,
    record: JobRecord,
    final: Callable[[JobRecord], ProgressEvent],
    *,
    after: int = 0,
    previews: bool = False,
    poll_s: float = POLL_S,
) -> AsyncIterator[Watched]:
    """A job's events after sequence number `after`, then `final(record)` once the record is final.

    A job already final when the watch starts gets its final event alone. The store is read off the
    event loop; the watcher ends with the final event, or silently if the record expired meanwhile.
    """
    seq = after
    while record.status not in FINAL:
        batch = await asyncio.to_thread(store.events_after, record.id, seq)
        if not batch:
            # Every step event is logged before the job is final: read the log once more after the
            # record says final, and nothing is missed.
            latest = await asyncio.to_thread(store.get_job, record.id)
            if latest is None:
                return
            record = latest
            if record.status in FINAL:
                batch = await asyncio.to_thread(store.events_after, record.id, seq)
            else:
                yield None
        for seq, stored in batch:
            event = loaded_event(stored)
            if previews or event.event != "preview":
                yield seq, event
        if record.status not in FINAL:
            await asyncio.sleep(poll_s)
    yield None, final(record)
