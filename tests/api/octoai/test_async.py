"""Async inference: OctoAI's `X-OctoAI-Async` protocol, driven by the octoai SDK and by plain HTTP."""

from __future__ import annotations

import httpx
import pytest
from conftest import b64_to_image
from helpers.engine_control import WAIT, wait_until
from helpers.requests import ASYNC, body

pytestmark = pytest.mark.usefixtures("controlled")


@pytest.fixture(scope="module")
def server(controlled_server):
    return controlled_server


def poll_until_final(client: httpx.Client, poll_url: str) -> dict:
    def final() -> dict | None:
        status = client.get(poll_url).json()
        return None if status["status"] in ("pending", "running") else status

    return wait_until(final, what=f"{poll_url} to reach a final status", every=0.05)


def test_sdk_infer_async_returns_the_synchronous_body(server):
    sdk = server.client()
    endpoint = f"{server.url}/generate/flux-dev"
    future = sdk.infer_async(endpoint, body("a lighthouse", seed=3))
    assert future.poll_url.startswith(server.url)
    wait_until(lambda: sdk.is_future_ready(future), what="async job")
    result = sdk.get_future_result(future)
    sync = httpx.post(endpoint, json=body("a lighthouse", seed=3), timeout=WAIT).json()
    assert [img["seed"] for img in result["images"]] == [3]
    assert b64_to_image(result["images"][0]["image_b64"]).size == (512, 512)
    assert result["images"][0]["image_b64"] == sync["images"][0]["image_b64"]


def test_async_jpeg_result_is_the_jpeg_a_sync_call_returns(server):
    endpoint = f"{server.url}/generate/flux-dev"
    jpeg = body("a lighthouse", image_encoding="jpeg")
    with httpx.Client(timeout=WAIT) as client:
        accepted = client.post(endpoint, json=jpeg, headers=ASYNC).json()
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
