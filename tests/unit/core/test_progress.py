"""Live progress pieces: latent previews, progress events with an ETA, and watchers sharing one reader."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections import Counter

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from octoflux.core.progress import (
    JobEventHub,
    StepClock,
    cancelled_event,
    completed_event,
    failed_event,
    final_event,
    preview_event,
    progress_event,
    stored_event,
    watch_job,
)
from octoflux.pipelines.engine import Engine, GenerationSpec, StepEvent
from octoflux.pipelines.preview import (
    FLUX_LATENT_RGB_BIAS,
    FLUX_LATENT_RGB_FACTORS,
    latents_to_rgb,
    preview_data_url,
)
from octoflux.state.records import COMPLETED, JobRecord
from octoflux.state.store import open_state_store

DATA_URL_PREFIX = "data:image/jpeg;base64,"


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith(DATA_URL_PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix(DATA_URL_PREFIX))))
    image.load()
    return image


def reference_projection(packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """diffusers' own unpacking, then the 16->3 matrix per latent pixel: [B, H/8, W/8, 3] in [-1, 1]-ish."""
    unpacked = FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=8)  # [B, 16, h, w]
    factors = torch.tensor(FLUX_LATENT_RGB_FACTORS)
    return torch.einsum("bchw,ck->bhwk", unpacked, factors) + torch.tensor(FLUX_LATENT_RGB_BIAS)


# --- Preview ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(1024, 1024), (1536, 640), (512, 768)])
def test_preview_is_a_small_jpeg_of_the_output_aspect(width, height):
    latents = torch.randn(2, (width // 16) * (height // 16), 64)
    image = decode_data_url(preview_data_url(latents, width, height))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert max(image.size) == 256
    assert image.size[0] / image.size[1] == pytest.approx(width / height, rel=0.02)


def test_projection_matches_diffusers_unpacking():
    width, height = 512, 256
    latents = torch.randn(2, (width // 16) * (height // 16), 64)
    expected = reference_projection(latents, width, height)
    for index in (0, 1):
        pixels = latents_to_rgb(latents, width, height, index)
        assert pixels.shape == (height // 8, width // 8, 3) and pixels.dtype == torch.uint8
        want = ((expected[index] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        assert torch.equal(pixels, want)


def test_preview_keeps_the_layout_of_the_image():
    # A bright top-left quadrant in the unpacked latent image stays top-left in the preview.
    width = height = 512
    unpacked = torch.zeros(1, 16, height // 8, width // 8)
    unpacked[:, 12, : height // 16, : width // 16] = 8.0  # channel 12 projects to grey (+, +, +)
    packed = FluxPipeline._pack_latents(unpacked, 1, 16, height // 8, width // 8)
    preview = decode_data_url(preview_data_url(packed, width, height))
    top_left = sum(preview.getpixel((32, 32)))
    bottom_right = sum(preview.getpixel((224, 224)))
    assert top_left > bottom_right + 200
    # Zero latents show the bias colour ((bias + 1) / 2 * 255), give or take JPEG rounding.
    expected = [round((b + 1) / 2 * 255) for b in FLUX_LATENT_RGB_BIAS]
    assert all(abs(got - want) <= 3 for got, want in zip(preview.getpixel((224, 224)), expected, strict=True))


def test_preview_refuses_latents_of_another_size():
    with pytest.raises(ValueError, match="do not fit a 1024x1024 image"):
        latents_to_rgb(torch.zeros(1, 1024, 64), 1024, 1024)


def test_previews_and_progress_from_the_tiny_engine(load_tiny, tiny_checkpoint):
    engine = Engine(load_tiny(), max_batch=1)
    spec = GenerationSpec(prompt="a lighthouse", width=512, height=256, steps=3, guidance=3.5, seeds=[1, 2])
    clock, progress, previews = StepClock(), [], []

    def on_step(event: StepEvent) -> None:
        clock.step(event.step, event.image_batch)
        eta = clock.eta_s(event.step, event.steps, event.image_batch, event.batches)
        progress.append(progress_event(event.step, event.steps, event.image_batch, eta).data)
        url = preview_data_url(event.latents, event.width, event.height)
        previews.append(preview_event(event.step, event.steps, event.image_batch, url))

    engine.generate(spec, on_step=on_step)
    assert [(p["image_batch"], p["step"]) for p in progress] == [(b, s) for b in (0, 1) for s in (1, 2, 3)]
    assert all(p["steps"] == 3 for p in progress)
    assert progress[0]["eta_s"] is None  # nothing measured yet
    # Measured from step 2 on (its value, rounded to 0.1 s, is 0.0 when the tiny model is fast; the
    # arithmetic is checked with fixed times below); nothing is left after the last step.
    assert progress[1]["eta_s"] is not None and clock.step_seconds > 0 and progress[-1]["eta_s"] == 0
    assert all(decode_data_url(p.data["image"]).size == (256, 128) for p in previews)


# --- Events and ETA -----------------------------------------------------------------------------


def test_progress_event_fields():
    event = progress_event(step=3, steps=28, image_batch=1, eta_s=12.345)
    assert event.event == "progress" and not event.final
    assert event.data == {"step": 3, "steps": 28, "image_batch": 1, "eta_s": 12.3}
    assert progress_event(1, 28, 0, None).data["eta_s"] is None


def test_final_events_carry_url_error_or_nothing():
    assert completed_event("https://h/v1/responses/abc").data == {
        "status": "completed",
        "response_url": "https://h/v1/responses/abc",
    }
    assert failed_event("out of memory").data == {"status": "failed", "error": "out of memory"}
    assert cancelled_event().data == {"status": "cancelled"}
    assert all(e.final for e in (completed_event("u"), failed_event("x"), cancelled_event()))
    assert final_event("failed", error="boom") == failed_event("boom")
    assert final_event("completed", response_url="u") == completed_event("u")
    with pytest.raises(ValueError):
        final_event("running")


def test_eta_comes_from_the_measured_step_time():
    clock = StepClock()
    clock.step(1, 0, now=100.0)  # the first step includes prompt encoding: not a step interval
    assert clock.eta_s(1, 10, 0, 2) is None
    clock.step(2, 0, now=100.5)
    clock.step(3, 0, now=101.0)
    assert clock.step_seconds == pytest.approx(0.5)
    # 7 steps left in batch 0 and 10 in batch 1 at 0.5 s each.
    assert clock.eta_s(3, 10, 0, 2) == pytest.approx(8.5)
    clock.step(1, 1, now=110.0)  # a new batch: the gap (decode, next prompt) is not a step
    assert clock.step_seconds == pytest.approx(0.5)
    assert clock.eta_s(10, 10, 1, 2) == 0


# --- Watching: one store reader per job, every watcher gets every event ---------------------------


@pytest.fixture
def counted_store(tmp_path):
    """A SQLite store whose event reads are counted per job."""
    store = open_state_store(f"sqlite:///{tmp_path}/state.db")
    reads: Counter[str] = Counter()
    read_events = store.events_after

    def counted(job_id: str, seq: int):
        reads[job_id] += 1
        return read_events(job_id, seq)

    store.events_after = counted
    store.reads = reads
    yield store
    store.close()


def running_job(store, job_id: str) -> JobRecord:
    store.create_job(JobRecord(job_id, None, "req", time.time(), replica="r"))
    store.mark_running(job_id)
    return store.get_job(job_id)


def final(record: JobRecord):
    return final_event(record.status, response_url=f"/v1/responses/{record.id}/result")


class Collected:
    """A watcher consumed in a task: the (sequence number, event) items it yielded, in order."""

    def __init__(self, watch):
        self.items: list = []
        self.task = asyncio.create_task(self._collect(watch))

    async def _collect(self, watch) -> None:
        async for batch in watch:
            self.items.extend(batch)


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_watchers_of_one_job_cost_the_store_reads_of_one_watcher(counted_store):
    """Job A has one watcher and job B twenty; both get the same events at the same moments."""
    store, watchers_of_b, steps = counted_store, 20, 6

    async def scenario():
        alone = Collected(watch_job(store, running_job(store, "a"), final))
        record_b = running_job(store, "b")
        crowd = [Collected(watch_job(store, record_b, final)) for _ in range(watchers_of_b)]
        for step in range(1, steps + 1):
            for job_id in ("a", "b"):
                store.append_event(job_id, stored_event(progress_event(step, steps, 0, None)))
            await until(lambda step=step: all(len(w.items) >= step for w in [alone, *crowd]))
        for job_id in ("a", "b"):
            store.finish_job(job_id, COMPLETED)
        await asyncio.gather(alone.task, *(w.task for w in crowd))
        return alone, crowd

    alone, crowd = asyncio.run(scenario())
    expected = [(step, progress_event(step, steps, 0, None)) for step in range(1, steps + 1)]
    for job_id, watchers in (("a", [alone]), ("b", crowd)):
        for watcher in watchers:
            assert watcher.items == [*expected, (None, completed_event(f"/v1/responses/{job_id}/result"))]
    # One reader per job whatever the number of watchers: B's reads are A's, give or take the phase of
    # the two readers' polls (each job is read several times per step here).
    assert store.reads["a"] >= steps
    assert store.reads["b"] <= store.reads["a"] + 2


def test_a_late_watcher_resumes_from_what_the_reader_holds(counted_store):
    """A watcher joining a watched job, with or without a last event id, costs no read of its own."""
    store = counted_store

    async def scenario():
        JobEventHub.of(store).poll_s = 3600  # the reader reads once, then only if a watcher did
        record = running_job(store, "job")
        for step in (1, 2, 3):
            store.append_event("job", stored_event(progress_event(step, 3, 0, None)))
        first = watch_job(store, record, final)
        assert [seq for seq, _ in await anext(first)] == [1, 2, 3]
        reads = store.reads["job"]
        late = [watch_job(store, record, final, after=after) for after in (0, 2)]
        from_start = [seq for seq, _ in await anext(late[0])]
        after_two = [seq for seq, _ in await anext(late[1])]
        for watch in (first, *late):
            await watch.aclose()
        return from_start, after_two, store.reads["job"] - reads

    from_start, after_two, reads_by_late_watchers = asyncio.run(scenario())
    assert from_start == [1, 2, 3] and after_two == [3]
    assert reads_by_late_watchers == 0


def test_the_reader_stops_when_its_last_watcher_leaves(counted_store):
    store = counted_store

    async def scenario():
        record = running_job(store, "job")
        hub = JobEventHub.of(store)
        watches = [watch_job(store, record, final) for _ in range(3)]
        for watch in watches:
            assert await anext(watch) == []  # subscribed: the first read found nothing
        assert hub.watched_jobs == ["job"]
        for watch in watches[:2]:
            await watch.aclose()
        assert hub.watched_jobs == ["job"]
        await watches[2].aclose()
        assert hub.watched_jobs == []
        reads = store.reads["job"]
        store.append_event("job", stored_event(progress_event(1, 2, 0, None)))
        await asyncio.sleep(0.5)  # over three poll periods: a reader still running would read
        return reads

    reads_when_left = asyncio.run(scenario())
    assert store.reads["job"] == reads_when_left
