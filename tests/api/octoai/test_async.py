"""Async inference: OctoAI's `X-OctoAI-Async` protocol, driven by the octoai SDK and by plain HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import STEPS, b64_to_image
from helpers.engine_control import WAIT, wait_until

from octoflux.core.async_jobs import AsyncJobs
from octoflux.core.queue import Job, JobQueue
from octoflux.pipelines.engine import GenerationSpec
from octoflux.state.store import open_state_store

ASYNC = {"X-OctoAI-Async": "1"}


def body(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "width": 512, "height": 512, "steps": STEPS, "seed": 3, **extra}


pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(controlled_server):
    return controlled_server


def poll_until_final(client: httpx.Client, poll_url: str) -> dict:
    deadline = time.monotonic() + WAIT
    while (status := client.get(poll_url).json())["status"] in ("pending", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def test_sdk_infer_async_returns_the_synchronous_body(server):
    sdk = server.client()
    endpoint = f"{server.url}/generate/flux-dev"
    future = sdk.infer_async(endpoint, body("a lighthouse"))
    assert future.poll_url.startswith(server.url)
    wait_until(lambda: sdk.is_future_ready(future), what="async job")
    result = sdk.get_future_result(future)
    sync = httpx.post(endpoint, json=body("a lighthouse"), timeout=WAIT).json()
    assert [img["seed"] for img in result["images"]] == [3]
    assert b64_to_image(result["images"][0]["image_b64"]).size == (512, 512)
    assert result["images"][0]["image_b64"] == sync["images"][0]["image_b64"]


def test_async_jpeg_result_is_the_jpeg_a_sync_call_returns(server):
    endpoint = f"{server.url}/generate/flux-dev"
    jpeg = body("a lighthouse", image_encoding="jpeg")
    with httpx.Client(timeout=WAIT) as client:
        accepted = client.post(endpoint, json=jpeg, headers={"X-OctoAI-Async": "1"}).json()
        status = poll_until_final(client, accepted["poll_url"])
        result = client.get(status["response_url"]).json()
        sync = client.post(endpoint, json=jpeg).json()
    image = b64_to_image(result["images"][0]["image_b64"])
    assert (image.format, image.size) == ("JPEG", (512, 512))
    assert result["images"][0]["image_b64"] == sync["images"][0]["image_b64"]


def test_poll_reports_running_then_pending_then_completed(server, control):
    gate = control.hold("first")
    with httpx.Client(timeout=WAIT) as client:
        first = client.post(f"{server.url}/generate/flux-dev", json=body("first"), headers=ASYNC)
        assert first.status_code == 202
        assert set(first.json()) == {"response_id", "poll_url"}
        control.reached["first"].wait(WAIT)
        second = client.post(f"{server.url}/generate/flux-dev", json=body("second"), headers=ASYNC).json()
        assert client.get(first.json()["poll_url"]).json()["status"] == "running"
        waiting = client.get(second["poll_url"]).json()
        assert waiting["status"] == "pending" and "response_url" not in waiting
        assert client.get(f"{server.url}/v1/responses/{second['response_id']}/result").status_code == 409
        gate.set()
        done = poll_until_final(client, second["poll_url"])
        assert done["status"] == "completed"
        assert done["response_url"].startswith(server.url)
        result = client.get(done["response_url"])
        assert result.status_code == 200 and len(result.json()["images"]) == 1


def test_delete_cancels_pending_and_running_jobs_and_the_worker_moves_on(server, control):
    gate = control.hold("running")
    with httpx.Client(timeout=WAIT) as client:
        running = client.post(
            f"{server.url}/generate/flux-dev", json=body("running", steps=50), headers=ASYNC
        ).json()
        control.reached["running"].wait(WAIT)
        pending = client.post(f"{server.url}/generate/flux-dev", json=body("pending"), headers=ASYNC).json()

        cancelled = client.delete(pending["poll_url"])
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.delete(running["poll_url"]).json()["status"] == "cancelled"
        assert server.service.jobs.depth == 0
        gate.set()
        after = client.post(f"{server.url}/generate/flux-dev", json=body("after"))
        assert after.status_code == 200
        assert client.get(running["poll_url"]).json()["status"] == "cancelled"
        assert client.delete(running["poll_url"]).status_code == 409
    assert control.steps["running"] == 1, "the running job stopped at its next denoising step"
    assert "pending" not in control.ran


def test_failed_async_job_reports_the_error_without_a_traceback(server, control):
    def explode(spec):
        raise RuntimeError("injected fault")

    control.fault = explode
    with httpx.Client(timeout=WAIT) as client:
        job = client.post(f"{server.url}/generate/flux-dev", json=body("doomed"), headers=ASYNC).json()
        status = poll_until_final(client, job["poll_url"])
        assert status["status"] == "failed"
        assert "injected fault" in status["error"] and "Traceback" not in status["error"]
        control.fault = None
        assert client.post(f"{server.url}/generate/flux-dev", json=body("fine")).status_code == 200


def test_unknown_response_id_is_404(server):
    response = httpx.get(f"{server.url}/v1/responses/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404


def test_async_result_is_readable_only_with_the_creating_token(server_factory):
    with server_factory(api_keys="alice-key,bob-key", warmup=False) as live:
        alice = {"Authorization": "Bearer alice-key"}
        bob = {"Authorization": "Bearer bob-key"}
        with httpx.Client(timeout=WAIT) as client:
            job = client.post(
                f"{live.url}/generate/flux-dev", json=body("private"), headers={**ASYNC, **alice}
            ).json()
            wait_until(lambda: client.get(job["poll_url"], headers=alice).json()["status"] == "completed")
            result_url = client.get(job["poll_url"], headers=alice).json()["response_url"]
            assert client.get(result_url, headers=alice).status_code == 200
            assert client.get(job["poll_url"], headers=bob).status_code == 404
            assert client.get(result_url, headers=bob).status_code == 404
            assert client.delete(job["poll_url"], headers=bob).status_code == 404
            assert client.get(job["poll_url"]).status_code == 401

        # The SDK's async calls use its bare httpx client: with auth on, give it the header.
        sdk = live.client(api_key="alice-key")
        sdk_with_auth = type(sdk)(
            api_key="alice-key",
            environment=sdk._client_wrapper.get_environment(),
            httpx_client=httpx.Client(headers=alice, timeout=WAIT),
        )
        future = sdk_with_auth.infer_async(f"{live.url}/generate/flux-dev", body("via sdk"))
        wait_until(lambda: sdk_with_auth.is_future_ready(future), what="async job via the SDK")
        assert len(sdk_with_auth.get_future_result(future)["images"]) == 1


# Async records on their own, over a real SQLite state store: TTL, ownership, restarts.


def finished_job() -> Job:
    return Job(spec=GenerationSpec(prompt="x", width=512, height=512, steps=1, guidance=3.5, seeds=[1]))


def async_jobs(path, ttl: float = 60.0) -> AsyncJobs:
    jobs = AsyncJobs(open_state_store(f"sqlite:///{path}/state.db"), replica="r1", ttl_s=ttl)
    jobs.heartbeat()
    return jobs


def test_finished_bodies_survive_a_restart_byte_for_byte(tmp_path):
    jobs = async_jobs(tmp_path)
    job = finished_job()
    jobs.create(job, owner="alice", encoding="png")
    body = bytes(range(256)) * 100
    assert jobs.complete(job.id, body)
    jobs.store.close()
    reopened = async_jobs(tmp_path)
    assert reopened.get(job.id, "alice").status == "completed"
    assert reopened.body(job.id) == body


def test_results_expire_after_the_ttl_and_belong_to_their_owner(tmp_path):
    # A TTL long enough that the reads right after completing come before it on a slow machine.
    jobs = async_jobs(tmp_path, ttl=1.0)
    job = finished_job()
    jobs.create(job, owner="alice", encoding="png")
    jobs.complete(job.id, b"{}")
    assert jobs.get(job.id, "alice").status == "completed"
    assert jobs.get(job.id, "bob") is None
    time.sleep(1.1)
    assert jobs.get(job.id, "alice") is None
    assert jobs.sweep() == 1


def test_pending_jobs_never_expire(tmp_path):
    jobs = async_jobs(tmp_path, ttl=0)
    job = finished_job()
    jobs.create(job, owner=None, encoding="png")
    assert jobs.get(job.id, None).status == "pending"


def test_a_cancel_wins_over_a_completion_that_arrives_later(tmp_path):
    jobs = async_jobs(tmp_path)
    job = finished_job()
    record = jobs.create(job, owner=None, encoding="png")
    assert jobs.cancel(record, JobQueue(4))
    assert not jobs.complete(job.id, b"{}")
    assert jobs.get(job.id, None).status == "cancelled" and jobs.body(job.id) is None
