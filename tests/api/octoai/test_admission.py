"""Admission control, deadlines and cancellation over HTTP: a bounded FIFO queue that answers 429 with
Retry-After when full, and a worker that never wastes steps on a job nobody wants."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from helpers.engine_control import WAIT, open_raw_request, wait_until
from helpers.requests import URL_PATH, body, post_in_thread
from octoai.core.api_error import ApiError

from octoflux.core import queue as jobs

pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, max_queue=1) as live:
        yield live


@pytest.fixture(scope="module")
def impatient_server(server_factory, control):
    with server_factory(engine_factory=control.factory, warmup=False, request_timeout=1.0) as live:
        yield live


def test_queue_full_returns_429_with_retry_after(server, control):
    gate = control.hold("running")
    results: dict = {}
    running = post_in_thread(server.url, body("running"), results, "running")
    assert control.reached["running"].wait(WAIT)
    queued = post_in_thread(server.url, body("queued"), results, "queued")
    wait_until(lambda: server.service.jobs.depth == 1, what="a queued job")
    try:
        rejected = httpx.post(f"{server.url}{URL_PATH}", json=body("rejected"), timeout=WAIT)
        assert rejected.status_code == 429
        assert int(rejected.headers["Retry-After"]) >= 1
        assert "busy" in rejected.json()["detail"]
        with pytest.raises(ApiError) as caught:
            server.client().image_gen.generate_flux_dev(**body("via the sdk"))
        assert caught.value.status_code == 429
    finally:
        gate.set()
    running.join(WAIT)
    queued.join(WAIT)
    assert results["running"].status_code == results["queued"].status_code == 200
    assert control.ran == ["running", "queued"]  # FIFO; rejected requests never reached the engine
    assert httpx.post(f"{server.url}{URL_PATH}", json=body("after"), timeout=WAIT).status_code == 200


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


def test_client_that_disconnects_while_queued_gets_its_job_dropped(server, control):
    queue = server.service.jobs
    release = control.hold("running")
    results: dict = {}
    running = post_in_thread(server.url, body("running"), results, "running")
    assert control.reached["running"].wait(WAIT)
    try:
        with pytest.raises(httpx.ReadTimeout):  # gives up while queued behind "running"
            httpx.post(f"{server.url}{URL_PATH}", json=body("abandoned"), timeout=1.0)
        # The server notices the disconnect and takes the job out of the queue while "running" still runs.
        wait_until(lambda: queue.depth == 0, what="the abandoned job to leave the queue")
        assert queue.running is not None and queue.running.spec.prompt == "running"
    finally:
        release.set()
    running.join(WAIT)
    assert results["running"].status_code == 200
    assert httpx.post(f"{server.url}{URL_PATH}", json=body("after"), timeout=WAIT).status_code == 200
    assert control.ran == ["running", "after"]  # the abandoned job never ran
    assert queue.depth == 0
