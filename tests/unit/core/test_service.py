"""The core without HTTP: the calls every API dialect makes, with the core's own types, on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers.engine_control import WAIT
from helpers.requests import STEPS
from PIL import Image

from octoflux.core import renderers
from octoflux.core.errors import Conflict, InvalidField, NotFound, NotReady, ShuttingDown
from octoflux.core.request import Caller, ImageRequest
from octoflux.core.service import GenerationService
from octoflux.settings import Settings


def settings(tiny_checkpoint, tmp_path, **overrides) -> Settings:
    values = dict(
        model=tiny_checkpoint,
        device="cpu",
        warmup=False,
        lora_dir=tmp_path / "loras",
        state_dir=tmp_path / "state",
    )
    (tmp_path / "loras").mkdir(exist_ok=True)
    return Settings(**{**values, **overrides})


def request(prompt: str = "a fox", **fields) -> ImageRequest:
    return ImageRequest(prompt=prompt, **{"width": 512, "height": 512, "steps": STEPS, "seed": 5, **fields})


async def never_gone() -> None:
    await asyncio.Event().wait()


def seeds_of(generated, options: dict | None = None) -> bytes:
    """A stand-in dialect body: the seeds, as a dialect would render them."""
    return repr([item.seed for item in generated.images]).encode()


SEEDS_DIALECT = "test-seeds"
renderers.register(SEEDS_DIALECT, seeds_of)


@contextlib.asynccontextmanager
async def leasing(service):
    """The service's state keeper (which leases queued async jobs) running for the block."""
    keeper = asyncio.ensure_future(service.async_jobs.keep_state())
    try:
        yield
    finally:
        keeper.cancel()


@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory, control):
    svc = GenerationService(settings(tiny_checkpoint, tmp_path_factory.mktemp("svc")), control.factory)
    svc.load()
    yield svc
    svc.drain()
    svc.state.close()


pytestmark = pytest.mark.usefixtures("controlled")


def test_a_service_that_has_not_loaded_refuses_work_with_a_retry_after(tiny_checkpoint, tmp_path):
    idle = GenerationService(settings(tiny_checkpoint, tmp_path))
    with pytest.raises(NotReady) as caught:
        asyncio.run(idle.generation.prepare(request()))
    assert caught.value.retry_after and not idle.readiness().ready
    idle.state.close()


def test_generate_hands_the_dialect_images_and_seeds_and_traces_the_job(service):
    caller = Caller(request_id="r1", api="sync", client_gone=never_gone)

    async def run():
        spec = await service.generation.prepare(request(num_images=2))
        return await service.generation.generate(spec, caller, lambda generated: generated)

    generated = asyncio.run(run())
    assert [item.seed for item in generated.images] == [5, 6]
    assert all(
        isinstance(item.image, Image.Image) and item.image.size == (512, 512) for item in generated.images
    )
    assert (generated.width, generated.height) == (512, 512) and generated.seconds > 0
    trace = caller.trace.fields()
    assert trace["job_id"] and trace["gpu_ms"] > 0 and "encode_ms" in trace


def test_prepare_names_the_bad_field_before_any_work_is_queued(service):
    with pytest.raises(InvalidField) as caught:
        asyncio.run(service.generation.prepare(request(loras={"nowhere": 1.0})))
    assert caught.value.field == "loras" and service.jobs.depth == 0


def test_async_job_is_polled_then_its_body_read_and_it_cannot_be_cancelled_after(service):
    async def run():
        jobs = service.async_jobs
        spec = await service.generation.prepare(request("async"))
        async with leasing(service):
            record = await jobs.start(
                spec, Caller(request_id="r2", api="async", owner="alice"), SEEDS_DIALECT
            )
            while (await jobs.poll(record.id, "alice")).status not in ("completed", "failed"):
                await asyncio.sleep(0.02)
        with pytest.raises(NotFound):
            await jobs.poll(record.id, "bob")
        body = await jobs.result(record.id, "alice")
        with pytest.raises(Conflict):
            await jobs.cancel_by_owner(record.id, "alice")
        return body

    body = asyncio.run(asyncio.wait_for(run(), WAIT))
    assert body == b"[5]"  # the dialect's own rendering is what the result URL returns


def test_cancelling_a_running_async_job_stops_the_worker(service, control):
    gate = control.hold("held")

    async def run():
        jobs = service.async_jobs
        spec = await service.generation.prepare(request("held", steps=8))
        async with leasing(service):
            record = await jobs.start(spec, Caller(request_id="r3", api="async"), SEEDS_DIALECT)
            await asyncio.to_thread(control.reached["held"].wait, WAIT)
            assert (await jobs.poll(record.id, None)).status == "running"
            view = await jobs.cancel_by_owner(record.id, None)
            gate.set()
            while service.jobs.in_flight:
                await asyncio.sleep(0.02)
            return view, await jobs.poll(record.id, None)

    cancelled, later = asyncio.run(asyncio.wait_for(run(), WAIT))
    assert cancelled.status == later.status == "cancelled"
    assert control.steps["held"] < 8  # stopped at the next denoising step, not run to the end


def test_a_drained_service_refuses_new_work(tiny_checkpoint, tmp_path):
    svc = GenerationService(settings(tiny_checkpoint, tmp_path))
    svc.load()
    svc.drain()
    with pytest.raises(ShuttingDown):
        asyncio.run(svc.generation.prepare(request()))
    assert svc.readiness().status == "shutting down"
    svc.state.close()
