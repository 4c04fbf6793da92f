"""Live progress of an async job: its events and ETA, how the worker stores them, how watchers read them.

A watcher gets `progress` at each denoising step, `preview` every few steps when asked, then exactly
one final event (`completed`, `failed` or `cancelled`) and ends. Events travel through the state store
(`append_event` / `events_after`), so a watcher on any replica follows a job that runs on another.
The worker appends a `progress` event at every step and, every `PREVIEW_EVERY` steps, a `preview`
event; the final event is never logged: a watcher reads it from the job record once the job is final,
so it always matches what the poll URL says.

In one process, one task per watched job reads the store (`JobEventHub`) and hands what it reads to
every watcher of that job: watchers cost no store reads of their own. The wire format (SSE) belongs
to the API dialect that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from octoflux.pipelines.engine import StepEvent
from octoflux.pipelines.preview import preview_data_url
from octoflux.state.records import FINAL, JobRecord
from octoflux.state.store import EVENTS_KEPT, StateStore

log = logging.getLogger(__name__)

FINAL_EVENTS = ("completed", "failed", "cancelled")
# A preview costs 0.9-1.6 ms at the median on one CPU thread (benchmarks/progress.py), so every async
# job gets one every 4th step whether or not anyone watches (under 0.5 ms per step on average; a
# 28-step job stores 7 of about 20 KB); `?preview=1` only decides whether a stream forwards them.
PREVIEW_EVERY = 4
# How often a watched job's events are read from the store: watchers are at most this late behind it.
POLL_S = 0.15


# --- Events -------------------------------------------------------------------------------------


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


def stored_event(event: ProgressEvent) -> dict:
    return {"event": event.event, "data": event.data}


def loaded_event(stored: dict) -> ProgressEvent:
    return ProgressEvent(stored["event"], stored["data"])


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


# --- Publishing (the worker) --------------------------------------------------------------------


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


# --- Watching -----------------------------------------------------------------------------------

# What a watcher yields: the events ready at once, oldest first, each with its sequence number (None
# for the final event); an empty batch after a read that found nothing (a stream may send a keep-alive).
Watched = list[tuple[int | None, ProgressEvent]]
# One read of the store, as every watcher's queue gets it: empty when it found nothing.
_Logged = tuple[tuple[int, ProgressEvent], ...]


@dataclass(frozen=True)
class _End:
    """The last item of a feed: the final record, None when the record expired, or the read's error."""

    record: JobRecord | None
    error: Exception | None = None


class _JobFeed:
    """One job's events, read from the store by one task; each read goes to every watcher's queue."""

    def __init__(self, store: StateStore, job_id: str, poll_s: float, on_end: Callable[[_JobFeed], None]):
        self.store = store
        self.job_id = job_id
        self.poll_s = poll_s
        self.on_end = on_end
        self.recent: deque[tuple[int, ProgressEvent]] = deque(maxlen=EVENTS_KEPT)  # what the store keeps
        self.queues: set[asyncio.Queue[_Logged | _End]] = set()
        self.task = asyncio.create_task(self._read(), name=f"progress of job {job_id}")

    def join(self, after: int) -> asyncio.Queue[_Logged | _End]:
        """A queue holding the events read so far after `after`, then every later read."""
        queue: asyncio.Queue[_Logged | _End] = asyncio.Queue()
        backlog = tuple((seq, event) for seq, event in self.recent if seq > after)
        if backlog:
            queue.put_nowait(backlog)
        self.queues.add(queue)
        return queue

    def leave(self, queue: asyncio.Queue[_Logged | _End]) -> None:
        self.queues.discard(queue)
        if not self.queues and not self.task.done():
            self.task.cancel()
            self.on_end(self)

    def _send(self, item: _Logged | _End) -> None:
        for queue in self.queues:
            if item == () and not queue.empty():
                continue  # a watcher that is behind needs no "nothing new"
            queue.put_nowait(item)

    def _send_events(self, stored: list[tuple[int, dict]]) -> None:
        logged = tuple((seq, loaded_event(event)) for seq, event in stored)
        self.recent.extend(logged)
        if logged:
            self._send(logged)

    async def _read(self) -> None:
        try:
            end = await self._follow()
        except Exception as exc:  # the store failed: every watcher's stream ends with the error
            end = _End(None, exc)
        self.on_end(self)
        self._send(end)

    async def _follow(self) -> _End:
        seq = 0
        while True:
            stored = await asyncio.to_thread(self.store.events_after, self.job_id, seq)
            if not stored:
                # Every step event is logged before the job is final: read the log once more after the
                # record says final, and nothing is missed.
                record = await asyncio.to_thread(self.store.get_job, self.job_id)
                if record is None:
                    return _End(None)
                if record.status in FINAL:
                    self._send_events(await asyncio.to_thread(self.store.events_after, self.job_id, seq))
                    return _End(record)
                self._send(())
            else:
                self._send_events(stored)
                seq = stored[-1][0]
            await asyncio.sleep(self.poll_s)


class JobEventHub:
    """The event feeds of one state store's watched jobs in this process: one reader per job."""

    def __init__(self, store: StateStore, poll_s: float = POLL_S):
        self.store = store
        self.poll_s = poll_s
        self._feeds: dict[str, _JobFeed] = {}

    @classmethod
    def of(cls, store: StateStore) -> JobEventHub:
        """The store's hub on the running event loop, made on first use."""
        hubs = _HUBS.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
        hub = hubs.get(store)
        if hub is None:
            hub = hubs[store] = cls(store)
        return hub

    @property
    def watched_jobs(self) -> list[str]:
        return list(self._feeds)

    @contextlib.contextmanager
    def subscribe(self, job_id: str, after: int = 0) -> Iterator[asyncio.Queue[_Logged | _End]]:
        """A queue of the job's reads after sequence number `after`, then its end, until the context ends."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _JobFeed(self.store, job_id, self.poll_s, self._ended)
        queue = feed.join(after)
        try:
            yield queue
        finally:
            feed.leave(queue)

    def _ended(self, feed: _JobFeed) -> None:
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]


# Hubs by event loop (a feed's task and queues belong to one), then by store. A hub holds its store:
# both go when the loop does.
_HUBS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def watch_job(
    store: StateStore,
    record: JobRecord,
    final: Callable[[JobRecord], ProgressEvent],
    *,
    after: int = 0,
    previews: bool = False,
) -> AsyncIterator[Watched]:
    """A job's events after sequence number `after`, then `final(record)` once the record is final.

    A job already final when the watch starts gets its final event alone. The events come from the
    job's feed in this process (`JobEventHub`), in batches of what was read at once; the watcher ends
    with the final event, or silently if the record expired meanwhile.
    """
    if record.status in FINAL:
        yield [(None, final(record))]
        return
    with JobEventHub.of(store).subscribe(record.id, after) as queue:
        while True:
            reads = [await queue.get()]
            while not queue.empty():  # a watcher that fell behind catches up in one batch
                reads.append(queue.get_nowait())
            end = reads.pop() if isinstance(reads[-1], _End) else None
            batch: Watched = [
                (seq, event)
                for logged in reads
                for seq, event in logged
                if seq > after and (previews or event.event != "preview")
            ]
            if end is None:
                yield batch
            elif end.error is not None:
                raise end.error
            else:
                if end.record is not None:
                    yield [*batch, (None, final(end.record))]
                return
