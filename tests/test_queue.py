"""The bounded FIFO queue: 429 with Retry-After when full, queued jobs dropped on disconnect."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_control import wrap_pipelines
from octoai.core.api_error import ApiError

from server.app import build_engine

HOLD = "hold the worker"


def body(prompt: str) -> dict:
    return {"prompt": prompt, "width": 512, "height": 512, "steps": 1, "seed": 1}


class Gate:
    """Runs before each pipeline call: records every pipeline batch; a HOLD prompt waits for `release`."""

    def __init__(self):
        self.prompts: list[str] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, spec) -> None:
        self.prompts.append(spec.prompt)
        if spec.prompt == HOLD:
            self.holding.set()
            assert self.release.wait(60), "test never released the worker"

    def reset(self) -> None:
        self.prompts.clear()
        self.holding.clear()
        self.release.clear()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def gated(server_factory, gate):
    def gated_engine(settings, library):
        engine = build_engine(settings, library)
        wrap_pipelines(engine, gate)
        return engine

    with server_factory(max_queue=1, engine_factory=gated_engine) as live:
        yield live


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def post(live, prompt: str, timeout: float = 60) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=timeout) as client:
        return client.post("/generate/flux-dev", json=body(prompt))


def test_queue_full_returns_429_with_retry_after(gated, gate, pool):
    gate.reset()
    jobs = gated.service.jobs
    running = pool.submit(post, gated, HOLD)
    assert gate.holding.wait(30)
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
        gate.release.set()
    assert running.result(60).status_code == 200
    assert queued.result(60).status_code == 200
    assert gate.prompts == [HOLD, "queued"]  # FIFO; rejected requests never reached the engine
    assert post(gated, "after").status_code == 200


def test_client_that_disconnects_while_queued_gets_its_job_dropped(gated, gate, pool):
    gate.reset()
    jobs = gated.service.jobs
    running = pool.submit(post, gated, HOLD)
    assert gate.holding.wait(30)
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(gated, "abandoned", timeout=1.0)  # gives up while queued behind HOLD
        # The server notices the disconnect and takes the job out of the queue while HOLD still runs.
        wait_until(lambda: jobs.depth == 0)
        assert jobs.running is not None and jobs.running.spec.prompt == HOLD
    finally:
        gate.release.set()
    assert running.result(60).status_code == 200
    assert post(gated, "after").status_code == 200
    assert gate.prompts == [HOLD, "after"]  # the abandoned job never ran
    assert jobs.depth == 0
