"""`GenerationService` without HTTP: the same calls every API dialect makes, on the tiny model."""

from __future__ import annotations

import asyncio

import pytest
from conftest import STEPS, b64_to_image
from helpers.engine_control import WAIT

from octoflux.api.octoai.protocol import GenerateRequest
from octoflux.core.errors import Conflict, InvalidField, NotFound, NotReady, ShuttingDown
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


def request(prompt: str = "a fox", **fields) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, width=512, height=512, steps=STEPS, seed=5, **fields)


async def never_gone() -> None:
    await asyncio.Event().wait()


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
        asyncio.run(idle.prepare(request()))
    assert caught.value.retry_after and not idle.readiness().ready
    idle.state.close()


def test_generate_returns_the_octoai_body_with_the_requested_seeds(service):
    async def run():
        spec = await service.prepare(request(num_images=2))
        fields: dict = {}
        response = await service.generate(
            spec, encoding="jpeg", request_id="r1", client_gone=never_gone, log_fields=fields
        )
        return response, fields

    response, fields = asyncio.run(run())
    assert [image.seed for image in response.images] == [5, 6]
    assert b64_to_image(response.images[0].image_b64).format == "JPEG"
    assert fields["job_id"] and fields["gpu_ms"] > 0 and "encode_ms" in fields


def test_prepare_names_the_bad_field_before_any_work_is_queued(service):
    with pytest.raises(InvalidField) as caught:
        asyncio.run(service.prepare(request(loras={"nowhere": 1.0})))
    assert caught.value.field == "loras" and service.jobs.depth == 0


def test_async_job_is_polled_then_its_body_read_and_it_cannot_be_cancelled_after(service):
    async def run():
        spec = await service.prepare(request("async"))
        record = await service.start_async(
            spec, encoding="png", owner="alice", request_id="r2", log_fields={}
        )
        while (await service.poll(record.id, "alice")).status not in ("completed", "failed"):
            await asyncio.sleep(0.02)
        with pytest.raises(NotFound):
            await service.poll(record.id, "bob")
        body = await service.result(record.id, "alice")
        with pytest.raises(Conflict):
            await service.cancel(record.id, "alice")
        return body

    body = asyncio.run(asyncio.wait_for(run(), WAIT))
    assert b'"seed":5' in body


def test_cancelling_a_running_async_job_stops_the_worker(service, control):
    gate = control.hold("held")

    async def run():
        spec = await service.prepare(GenerateRequest(prompt="held", width=512, height=512, steps=8))
        record = await service.start_async(spec, encoding="png", owner=None, request_id="r3", log_fields={})
        await asyncio.to_thread(control.reached["held"].wait, WAIT)
        assert (await service.poll(record.id, None)).status == "running"
        view = await service.cancel(record.id, None)
        gate.set()
        while service.jobs.in_flight:
            await asyncio.sleep(0.02)
        return view, await service.poll(record.id, None)

    cancelled, later = asyncio.run(asyncio.wait_for(run(), WAIT))
    assert cancelled.status == later.status == "cancelled"
    assert control.steps["held"] < 8  # stopped at the next denoising step, not run to the end


def test_a_drained_service_refuses_new_work(tiny_checkpoint, tmp_path):
    svc = GenerationService(settings(tiny_checkpoint, tmp_path))
    svc.load()
    svc.drain()
    with pytest.raises(ShuttingDown):
        asyncio.run(svc.prepare(request()))
    assert svc.readiness().status == "shutting down"
    svc.state.close()
