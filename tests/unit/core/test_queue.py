"""The bounded FIFO queue: 429 with Retry-After when full, queued jobs dropped on disconnect."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers.engine_control import WAIT, wait_until
from octoai.core.api_error import ApiError

HOLD = "hold the worker"


def body(prompt: str) -> dict:
    return {"prompt": prompt, "width": 512, "height": 512, "steps": 1, "seed": 1}


@pytest.fixture(scope="module")
def gated(server_factory, control):
    with server_factory(max_queue=1, engine_factory=control.factory) as live:
        yield live


pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def post(live, prompt: str, timeout: float = 60) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=timeout) as client:
        return client.post("/generate/flux-dev", json=body(prompt))


def test_queue_full_returns_429_with_retry_after(gated, control, pool):
    jobs = gated.service.jobs
    release = control.hold(HOLD)
    running = pool.submit(post, gated, HOLD)
    assert control.reached[HOLD].wait(WAIT)
    queued = pool.submit(post, gated, "queued")
    wait_until(lambda: jobs.depth == 1)
    try:
        rejected = post(gated, "one too many")
        assert rejected.status_code == 429
        assert int(rejected.headers["retry-after"]) >= 1
        assert "busy" in rejected.json()["detail"]
        with pytest.raises(ApiError) as caught:
            gated.client().image_gen.generate_flux_dev(**body("via the sdk"))
        assert caught.value.status_code == 429
    finally:
        release.set()
    assert running.result(60).status_code == 200
    assert queued.result(60).status_code == 200
    assert control.ran == [HOLD, "queued"]  # FIFO; rejected requests never reached the engine
    assert post(gated, "after").status_code == 200


def test_client_that_disconnects_while_queued_gets_its_job_dropped(gated, control, pool):
    jobs = gated.service.jobs
    release = control.hold(HOLD)
    running = pool.submit(post, gated, HOLD)
    assert control.reached[HOLD].wait(WAIT)
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(gated, "abandoned", timeout=1.0)  # gives up while queued behind HOLD
        # The server notices the disconnect and takes the job out of the queue while HOLD still runs.
        wait_until(lambda: jobs.depth == 0)
        assert jobs.running is not None and jobs.running.spec.prompt == HOLD
    finally:
        release.set()
    assert running.result(60).status_code == 200
    assert post(gated, "after").status_code == 200
    assert control.ran == [HOLD, "after"]  # the abandoned job never ran
    assert jobs.depth == 0
