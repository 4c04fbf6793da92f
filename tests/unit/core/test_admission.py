"""Admission control, deadlines and cancellation: the worker never wastes steps on a job nobody wants."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import STEPS
from helpers.engine_control import WAIT, open_raw_request, wait_until

from octoflux.core import queue as jobs
from octoflux.core.queue import JobQueue, QueueFull
from octoflux.pipelines.engine import GenerationSpec

URL_PATH = "/generate/flux-dev"


def body(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "width": 512, "height": 512, "steps": STEPS, "seed": 5, **extra}


pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, max_queue=1) as live:
        yield live


@pytest.fixture(scope="module")
def impatient_server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, request_timeout=1.0) as live:
        yield live


def post_in_thread(url: str, payload: dict, results: dict, key: str) -> threading.Thread:
    def send():
        results[key] = httpx.post(f"{url}{URL_PATH}", json=payload, timeout=WAIT)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_queue_full_returns_429_with_retry_after(server, control):
    gate = control.hold("running")
    results: dict = {}
    running = post_in_thread(server.url, body("running"), results, "running")
    control.reached["running"].wait(WAIT)
    queued = post_in_thread(server.url, body("queued"), results, "queued")
    wait_until(lambda: server.service.jobs.depth == 1, what="a queued job")

    rejected = httpx.post(f"{server.url}{URL_PATH}", json=body("rejected"), timeout=WAIT)
    assert rejected.status_code == 429
    assert int(rejected.headers["Retry-After"]) >= 1
    assert "busy" in rejected.json()["detail"]
    gate.set()
    running.join(WAIT)
    queued.join(WAIT)
    assert results["running"].status_code == results["queued"].status_code == 200
    assert httpx.post(f"{server.url}{URL_PATH}", json=body("after")).status_code == 200


def spec(steps: int, images: int = 1) -> GenerationSpec:
    return GenerationSpec(prompt="x", width=512, height=512, steps=steps, guidance=3.5, seeds=[1] * images)


def test_retry_after_follows_measured_throughput():
    queue = JobQueue(max_queue=1)
    queue.observe(spec(steps=10), seconds=20.0)  # 8 s per unit of work
    queue.submit(spec(steps=10))
    with pytest.raises(QueueFull) as full:
        queue.submit(spec(steps=10))
    assert full.value.retry_after == 20
    queue.observe(spec(steps=10), seconds=2.0)
    assert queue.retry_after_seconds() < 20
    assert JobQueue(max_queue=1).retry_after_seconds() == 1


def test_sync_timeout_interrupts_the_running_job_at_the_next_step(impatient_server, control):
    gate = control.hold("slow")
    started = time.monotonic()
    response = httpx.post(f"{impatient_server.url}{URL_PATH}", json=body("slow", steps=50), timeout=WAIT)
    assert response.status_code == 504
    assert "timed out" in response.json()["detail"] and "interrupted" in response.json()["detail"]
    assert time.monotonic() - started < 5
    gate.set()
    wait_until(lambda: impatient_server.service.jobs.in_flight == 0, what="the worker to stop the job")
    assert control.steps["slow"] == 1
    assert httpx.post(f"{impatient_server.url}{URL_PATH}", json=body("next"), timeout=WAIT).status_code == 200


def test_sync_timeout_drops_a_queued_job(impatient_server, control):
    gate = control.hold("blocking")
    results: dict = {}
    blocking = post_in_thread(impatient_server.url, body("blocking"), results, "blocking")
    control.reached["blocking"].wait(WAIT)
    response = httpx.post(f"{impatient_server.url}{URL_PATH}", json=body("queued"), timeout=WAIT)
    assert response.status_code == 504 and "dropped from the queue" in response.json()["detail"]
    assert impatient_server.service.jobs.depth == 0
    gate.set()
    blocking.join(WAIT)
    assert "queued" not in control.ran


def test_client_disconnect_cancels_the_running_job_and_the_worker_moves_on(server, control):
    gate = control.hold("abandoned")
    sock = open_raw_request(server.url, URL_PATH, json.dumps(body("abandoned", steps=50)).encode())
    control.reached["abandoned"].wait(WAIT)
    running = server.service.jobs.running
    sock.close()
    wait_until(lambda: running.cancel_reason == jobs.CLIENT_GONE, timeout=5, what="disconnect noticed")
    results: dict = {}
    started = time.monotonic()
    follower = post_in_thread(server.url, body("follower"), results, "follower")
    gate.set()
    follower.join(WAIT)
    assert results["follower"].status_code == 200
    assert time.monotonic() - started < 15
    assert control.steps["abandoned"] == 1, "stopped at the first step callback out of 50"


def test_client_disconnect_drops_its_queued_job(server, control):
    gate = control.hold("running")
    results: dict = {}
    running = post_in_thread(server.url, body("running"), results, "running")
    control.reached["running"].wait(WAIT)
    sock = open_raw_request(server.url, URL_PATH, json.dumps(body("impatient")).encode())
    wait_until(lambda: server.service.jobs.depth == 1, what="the job to queue")
    sock.close()
    wait_until(lambda: server.service.jobs.depth == 0, timeout=5, what="the queued job to be dropped")
    gate.set()
    running.join(WAIT)
    assert results["running"].status_code == 200
    assert "impatient" not in control.ran
